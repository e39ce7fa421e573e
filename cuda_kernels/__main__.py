"""`python -m cuda_kernels build`: build the fused ops ahead of time and print what was built.

`--cuda` compiles the CUDA sources too where nvcc and a CUDA build of torch are present, GPU or not (as
FA_KERNELS_CUDA=1 does; without it they are compiled only where a GPU can run them). Exits non-zero when the build
fails, including when the CUDA sources were to be compiled and do not compile.
"""
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m cuda_kernels build [--cuda] [--verbose]", file=sys.stderr)
        return 2
    import os

    if "--cuda" in argv:
        os.environ["FA_KERNELS_CUDA"] = "1"
    from .build import KernelBuildError, build

    try:
        manifest = build(verbose="--verbose" in argv)
    except KernelBuildError as e:
        print(f"cuda_kernels: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2))
    if not manifest["cuda_compiled"]:
        print(f"cuda_kernels: CPU kernels only ({manifest['cuda_reason']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m cuda_kernels build`: build the fused ops ahead of time and print what was built.

Exits non-zero when the build fails, including when nvcc and a CUDA torch are present but the CUDA sources
do not compile.
"""
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m cuda_kernels build [--verbose]", file=sys.stderr)
        return 2
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

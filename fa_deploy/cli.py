"""Entry points of the deployment side, kept under their old module name (`python -m fa_deploy.cli` is fa-bench,
as under torchrun). Each command lives in its own module: `bench_cli` (fa-bench), `export_cli` (fa-export)."""
from fa_deploy.bench_cli import main
from fa_deploy.export_cli import export_main

__all__ = ["main", "export_main"]

if __name__ == "__main__":
    main()

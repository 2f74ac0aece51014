"""``python -m mamba_deploy.cli`` (and ``torchrun -m mamba_deploy.cli train …``, which needs a module to run)."""
from . import main

main(prog_name="mamba-deploy")

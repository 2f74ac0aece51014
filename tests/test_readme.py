"""README's contract tables are generated from the contract module; this keeps the copy honest."""
from pathlib import Path

from mamba_deploy.onnx.contract import contract_markdown


def test_readme_contract_section_matches_contract_module():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("<!-- contract:begin -->\n", 1)[1].split("\n<!-- contract:end -->", 1)[0]
    assert section == contract_markdown(), "regenerate with: python -m mamba_deploy.onnx.contract"

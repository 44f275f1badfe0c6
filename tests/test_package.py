"""The library's boundary: public names, version, and no import of the application or of
optional integrations (avalanche)."""

import ast
import pathlib
import subprocess
import sys

import mas_optim

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_public_api():
    for name in ("LocalSgd", "MasPenalty", "OmegaSgd", "RegParamsError", "add_mas_penalty",
                 "atomic_write", "compute_omega", "consolidate_reg_params", "init_reg_params",
                 "load_reg_params", "save_reg_params"):
        assert hasattr(mas_optim, name), name
    assert issubclass(mas_optim.RegParamsError, ValueError)
    assert issubclass(mas_optim.LocalSgd, __import__("torch").optim.SGD)
    assert issubclass(mas_optim.OmegaSgd, __import__("torch").optim.SGD)
    assert mas_optim.__version__.count(".") == 2


def test_library_never_imports_the_application():
    app = {"train", "model_class", "utils", "benchmarks", "tests"}
    for path in (ROOT / "mas_optim").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in app, f"{path.name} imports {name}"
    code = ("import sys, mas_optim; print(sorted(m for m in ('train', 'model_class', 'utils', "
            "'avalanche') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_imports_another_modules_private_names():
    """Private helper modules (``_kernels``, ``_validate``) may be imported; a name starting
    with ``_`` from another module may not."""
    for path in (ROOT / "mas_optim").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for alias in node.names:
                    module = path.parent / (node.module or "")
                    is_module = (module / f"{alias.name}.py").exists() or (
                        module / alias.name).is_dir()
                    assert not alias.name.startswith("_") or is_module, \
                        f"{path.name} imports {alias.name} from {node.module}"


def test_functional_core_is_public_and_one_place_picks_the_implementation():
    import torch

    from mas_optim import functional

    assert mas_optim.functional is functional
    impl, why = functional.implementation([torch.zeros(2)], foreach=True)
    assert (impl, why) == ("foreach", "foreach=True")
    impl, why = functional.implementation([torch.zeros(2)], fused=False)
    assert impl == "single_tensor" and why

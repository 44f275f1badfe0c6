"""reg_params: init, consolidate, and a file format that survives reloads and refuses harm."""

import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mas_optim
from mas_optim import LocalSgd, RegParamsError


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def test_init_reg_params():
    model = make_model()
    model[2].bias.requires_grad_(False)
    reg = mas_optim.init_reg_params(model, freeze_layers=("0.bias",))
    assert set(reg) == {"0.weight", "2.weight"}
    assert torch.equal(reg["0.weight"]["init_val"], model[0].weight)
    assert reg["0.weight"]["init_val"].data_ptr() != model[0].weight.data_ptr()
    assert not reg["0.weight"]["omega"].any()
    with pytest.raises(ValueError, match="freeze_layers names no parameter"):
        mas_optim.init_reg_params(model, freeze_layers=("0.wieght",))


def test_consolidate_sum_and_alpha():
    model = make_model()
    reg = mas_optim.init_reg_params(model)
    held = reg["0.weight"]["omega"]
    new = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    mas_optim.consolidate_reg_params(reg, model, new, accumulate="sum")
    mas_optim.consolidate_reg_params(reg, model, new, accumulate="sum")
    assert torch.equal(reg["0.weight"]["omega"], torch.full_like(held, 4.0))
    assert reg["0.weight"]["omega"] is held  # in place: an optimizer holding it sees the update
    with torch.no_grad():
        model[0].weight.add_(1.0)
    third = {n: torch.full_like(p, 10.0) for n, p in model.named_parameters()}
    out = mas_optim.consolidate_reg_params(reg, model, third, accumulate=0.25)
    assert out is reg
    assert torch.allclose(reg["0.weight"]["omega"], torch.full_like(held, 0.25 * 4 + 0.75 * 10))
    assert torch.equal(reg["0.weight"]["init_val"], model[0].weight)
    for bad in ("mean", 1.5, -0.1, True):
        with pytest.raises(ValueError, match="accumulate"):
            mas_optim.consolidate_reg_params(reg, model, third, accumulate=bad)
    with pytest.raises(KeyError, match="no entry"):
        mas_optim.consolidate_reg_params(reg, model, {"0.weight": third["0.weight"]})
    third["0.bias"] = torch.full_like(third["0.bias"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        mas_optim.consolidate_reg_params(reg, model, third)


def trained_reg_params(model):
    reg = mas_optim.init_reg_params(model)
    g = torch.Generator().manual_seed(0)
    omega = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
    return mas_optim.consolidate_reg_params(reg, model, omega)


def test_save_load_round_trip_keeps_the_penalty_live(tmp_path):
    model = make_model()
    reg = trained_reg_params(model)
    path = tmp_path / "models" / "reg_params.pickle"
    path.parent.mkdir()
    mas_optim.save_reg_params(reg, path)
    assert [p.name for p in path.parent.iterdir()] == ["reg_params.pickle"]  # no temp left

    fresh = make_model()  # same weights as when reg was saved
    loaded = mas_optim.load_reg_params(path, model=fresh)
    for n in reg:
        for k in ("omega", "init_val"):
            assert torch.equal(loaded[n][k], reg[n][k])
    opt = LocalSgd(fresh.named_parameters(), reg_params=loaded, reg_lambda=1.0, lr=0.1)
    assert opt.penalty().item() == 0.0
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.5)
    assert opt.penalty().item() > 0.0  # the penalty sees the reloaded reg_params
    before = [p.detach().clone() for p in fresh.parameters()]
    for p in fresh.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # with no task gradient, only the penalty moves the parameters: back to θ*
    for p, b, (n, _) in zip(fresh.parameters(), before, fresh.named_parameters()):
        assert ((p - loaded[n]["init_val"]).abs() < (b - loaded[n]["init_val"]).abs()).all()


def test_other_dtypes_and_scalars_round_trip(tmp_path):
    reg = {"a": {"omega": torch.rand(3, dtype=torch.float64), "init_val": torch.rand(3).double()},
           "b": {"omega": torch.rand(2, 2).bfloat16(), "init_val": torch.rand(2, 2).bfloat16()},
           "s": {"omega": torch.tensor(1.5), "init_val": torch.tensor(-2.0)},
           "e": {"omega": torch.zeros(0, 4), "init_val": torch.zeros(0, 4)}}
    mas_optim.save_reg_params(reg, tmp_path / "r.pickle")
    loaded = mas_optim.load_reg_params(tmp_path / "r.pickle")
    for n in reg:
        for k in reg[n]:
            assert loaded[n][k].dtype == reg[n][k].dtype
            assert torch.equal(loaded[n][k], reg[n][k])


def test_save_refuses_tensor_keys(tmp_path):
    model = make_model()
    by_tensor = {p: {"omega": torch.zeros_like(p), "init_val": p.detach()}
                 for p in model.parameters()}
    with pytest.raises(TypeError, match="parameter names"):
        mas_optim.save_reg_params(by_tensor, tmp_path / "r.pickle")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    model = make_model()
    path = tmp_path / "reg_params.pickle"
    mas_optim.save_reg_params(trained_reg_params(model), path)
    old = path.read_bytes()

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mas_optim.atomic_write(path, b"half", before_replace=crash)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["reg_params.pickle"]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "reg_params.pickle"
    path.write_bytes(pickle.dumps({"format": "mas_optim.reg_params", "params": Exploit()}))
    with pytest.raises(RegParamsError, match=r"reg_params.pickle: refused.*(posix|os)\.system"):
        mas_optim.load_reg_params(path)
    assert not marker.exists()


def test_torch_pickled_tensors_are_refused(tmp_path):
    """A file of pickled tensors (a dict keyed by name, saved with pickle) needs torch's globals:
    refused."""
    path = tmp_path / "old.pickle"
    path.write_bytes(pickle.dumps({"w": {"omega": torch.zeros(2), "init_val": torch.zeros(2)}}))
    with pytest.raises(RegParamsError, match="refused"):
        mas_optim.load_reg_params(path)


def save_good(tmp_path):
    model = make_model()
    path = tmp_path / "reg_params.pickle"
    mas_optim.save_reg_params(trained_reg_params(model), path)
    return model, path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "damaged or truncated"),
    (lambda b: b[:-1], "damaged or truncated"),
    (lambda b: b"", "empty file"),
    (lambda b: b"\x00garbage\xff" * 10, "damaged or truncated"),
    (lambda b: b"PK\x03\x04 a zip, maybe a torch.save file", "damaged or truncated"),
    (lambda b: pickle.dumps([1, 2, 3]), "not a mas_optim reg_params file"),
    (lambda b: pickle.dumps({"format": "mas_optim.reg_params", "version": 99}),
     "unsupported reg_params format version 99"),
])
def test_damaged_files(tmp_path, damage, message):
    _, path = save_good(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(RegParamsError, match=message) as info:
        mas_optim.load_reg_params(path)
    assert str(path) in str(info.value)


def payload_with(tmp_path, **tensor):
    blob = {"dtype": "float32", "shape": [2], "data": torch.zeros(2).numpy().tobytes()}
    blob.update(tensor)
    path = tmp_path / "r.pickle"
    path.write_bytes(pickle.dumps({"format": "mas_optim.reg_params", "version": 1,
                                   "byteorder": "little",
                                   "params": {"w": {"omega": blob, "init_val": blob}}}))
    return path


@pytest.mark.parametrize("tensor, message", [
    (dict(shape=[3]), "holds 8 bytes, shape \\[3\\] needs 12"),
    (dict(dtype="int64"), "unsupported dtype"),
    (dict(shape=[-2]), "invalid shape"),
    (dict(data=torch.tensor([1.0, float("nan")]).numpy().tobytes()), "NaN or Inf"),
    (dict(data=torch.tensor([float("inf"), 0.0]).numpy().tobytes()), "NaN or Inf"),
])
def test_bad_tensors(tmp_path, tensor, message):
    with pytest.raises(RegParamsError, match=message):
        mas_optim.load_reg_params(payload_with(tmp_path, **tensor))


def test_missing_unreadable_and_mismatched(tmp_path):
    with pytest.raises(RegParamsError, match="no such file"):
        mas_optim.load_reg_params(tmp_path / "nope.pickle")
    with pytest.raises(RegParamsError, match="is a directory"):
        mas_optim.load_reg_params(tmp_path)
    model, path = save_good(tmp_path)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(RegParamsError, match=r"0.weight has shape \(5, 4\), the model's has \(6, 4\)"):
        mas_optim.load_reg_params(path, model=other)
    with pytest.raises(RegParamsError, match="does not have"):
        mas_optim.load_reg_params(path, model=nn.Sequential(nn.Linear(4, 5)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_only_ever_raise_reg_params_error(tmp_path, data):
    path = tmp_path / "fuzz.pickle"
    path.write_bytes(data)
    with pytest.raises(RegParamsError):
        mas_optim.load_reg_params(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0), flip=st.integers(min_value=0, max_value=255))
def test_corrupted_real_files_never_escape_as_other_errors(tmp_path, cut, flip):
    _, path = save_good(tmp_path)
    raw = bytearray(path.read_bytes())
    i = cut % len(raw)
    raw[i] ^= flip or 1
    path.write_bytes(bytes(raw))
    try:
        mas_optim.load_reg_params(path)  # a flip inside float data can still be a valid file
    except RegParamsError:
        pass


@pytest.mark.parametrize("value, want", [("sum", "sum"), ("0.5", 0.5), (" 1 ", 1.0), (0.25, 0.25),
                                         (0, 0.0), (1, 1.0)])
def test_parse_accumulate_takes_sum_or_a_number_in_0_1(value, want):
    assert mas_optim.reg_params.parse_accumulate(value) == want


@pytest.mark.parametrize("value", ["mean", "1.5", "-0.1", "nan", 1.5, float("nan"), True, None])
def test_parse_accumulate_refuses_anything_else_in_one_line(value):
    with pytest.raises(ValueError, match=r"^accumulate must be 'sum' or a number in \[0, 1\], "
                                         r"got .*$"):
        mas_optim.reg_params.parse_accumulate(value)


# ------------------------------------------------------------------ PEFT / LoRA adapters

def lora_model(adapter="default"):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    return peft, peft.get_peft_model(base, config, adapter_name=adapter), config


def test_lora_reg_params_hold_only_the_trainable_adapter():
    _, model, _ = lora_model()
    reg = mas_optim.init_reg_params(model)
    assert reg and set(reg) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n and ".default." in n for n in reg)


def lora_two_adapters():
    """Task A trained adapter 'default'; task B adds 'task_b' and trains it ('default' frozen)."""
    peft, model, config = lora_model()
    reg = mas_optim.init_reg_params(model)
    batches = [torch.randn(5, 4)]
    mas_optim.consolidate_reg_params(reg, model, mas_optim.compute_omega(model, batches))
    model.add_adapter("task_b", config)
    model.base_model.set_adapter(["default", "task_b"])
    for n, p in model.named_parameters():
        p.requires_grad_(".task_b." in n)
    return model, reg, batches


def test_consolidate_keeps_the_entries_of_a_frozen_adapter():
    model, reg, batches = lora_two_adapters()
    before = {n: {k: t.clone() for k, t in e.items()} for n, e in reg.items()}
    reg.update(mas_optim.init_reg_params(model))        # the new adapter joins
    omega = mas_optim.compute_omega(model, batches)     # Ω of the trainable adapter only
    assert not any(".default." in n for n in omega)
    mas_optim.consolidate_reg_params(reg, model, omega)
    for n, entry in before.items():
        assert all(torch.equal(reg[n][k], entry[k]) for k in entry), n
    task_b = [n for n in reg if ".task_b." in n]
    assert task_b and all(torch.equal(reg[n]["omega"], omega[n]) for n in task_b)


def test_a_trainable_parameter_without_omega_is_still_an_error():
    model, reg, batches = lora_two_adapters()
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(KeyError, match="omega has no entry"):
        mas_optim.consolidate_reg_params(reg, model, {})


def test_load_reg_params_accepts_entries_of_a_frozen_adapter(tmp_path):
    model, reg, _ = lora_two_adapters()
    mas_optim.save_reg_params(reg, tmp_path / "reg_params.pickle")
    loaded = mas_optim.load_reg_params(tmp_path / "reg_params.pickle", model=model)
    assert set(loaded) == set(reg) and all(".default." in n for n in loaded)
    assert all(torch.equal(loaded[n]["omega"], reg[n]["omega"]) for n in reg)


def test_an_adapter_name_mismatch_is_named(tmp_path):
    _, model_a, _ = lora_model("default")
    _, model_b, _ = lora_model("task_b")
    reg = mas_optim.init_reg_params(model_a)
    mas_optim.save_reg_params(reg, tmp_path / "reg_params.pickle")
    message = r"differ only by adapter name: 'default' in reg_params, 'task_b' in the parameters"
    with pytest.raises(RegParamsError, match=message):
        mas_optim.load_reg_params(tmp_path / "reg_params.pickle", model=model_b)
    with pytest.raises(KeyError, match=message):
        mas_optim.consolidate_reg_params(reg, model_b, {})


@pytest.mark.parametrize("expected, found, message", [
    (["module.0.weight", "module.0.bias"], ["0.weight", "0.bias"],
     r"differ by a prefix: reg_params' carry 'module\.'"),
    (["0.weight"], ["_orig_mod.0.weight"], r"differ by a prefix: the parameters' carry '_orig_mod\.'"),
    (["a.0.weight"], ["a.1.weight"], r"no name matches: e\.g\. 'a\.0\.weight' vs 'a\.1\.weight'"),
])
def test_explain_name_mismatch_names_a_wrapper_prefix_or_gives_examples(expected, found, message):
    import re
    assert re.search(message, mas_optim.reg_params.explain_name_mismatch(expected, found))

import pytest
import torch

from unlearn_core.errors import InputError
from unlearn_core.formats.files import (
    atomic_path,
    atomic_write_text,
    safe_child,
    safe_name,
    tensor_hash,
)

HOSTILE = ["..", "../x", "a/../../b", "/etc/passwd", "C:\\x", "x\\..\\y", "", " ", "con", "NUL.txt",
           "a\x00b", "a|b", "a;rm", "~root", ".hidden", "x" * 101, "trailing.", "a\nb",
           "%2e%2e", "a/%2e%2e/b", "lpt1.safetensors", "a\u202eb", "a/./b", "a//b"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(tmp_path, name):
    with pytest.raises(InputError, match=r"is (not allowed|empty).*(use 1-100 letters|give a file name)"):
        safe_child(tmp_path, name, ".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_good_names_stay_inside(tmp_path):
    assert safe_child(tmp_path, "flag fix.safetensors", ".safetensors") == tmp_path / "flag fix.safetensors"
    assert safe_child(tmp_path, "unlearn/flag_v2", ".safetensors") == tmp_path / "unlearn" / "flag_v2.safetensors"
    assert safe_name(" ok-name_1 ") == "ok-name_1"


def test_atomic_path_cleans_up_on_error(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_tensor_hash_sees_values_dtype_and_shape():
    import torch

    a = torch.arange(6.0)
    assert tensor_hash(a) == tensor_hash(a.clone())
    assert tensor_hash(a) != tensor_hash(a.reshape(2, 3))
    assert tensor_hash(a) != tensor_hash(a.double())
    assert tensor_hash(torch.tensor(1.0)) != tensor_hash(torch.tensor(2.0))


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os

    path = atomic_write_text(tmp_path / "a.txt", "x")
    old = os.umask(0o022)
    os.umask(old)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~old)


def test_one_safetensors_reader_says_which_file_was_expected_and_what_to_do(tmp_path):
    """LoRAs, full weights and CLI targets files are read by one reader: a missing or damaged file is
    an InputError naming what was expected and the fix; the metadata alone needs no tensor read."""
    from safetensors.torch import save_file

    from unlearn_core.formats.files import read_safetensors, safetensors_metadata

    good = tmp_path / "good.safetensors"
    save_file({"x": torch.ones(2)}, str(good), metadata={"unlearn.adapter": "lora"})
    tensors, metadata = read_safetensors(good, "LoRA file")
    assert torch.equal(tensors["x"], torch.ones(2)) and metadata == {"unlearn.adapter": "lora"}
    assert safetensors_metadata(good, "LoRA file") == {"unlearn.adapter": "lora"}
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match=r"targets file 'damaged.safetensors' is not a readable safetensors file .*; write it so"):
        read_safetensors(damaged, "targets file", "write it so")
    with pytest.raises(InputError, match=r"LoRA file '.*missing.safetensors' does not exist"):
        safetensors_metadata(tmp_path / "missing.safetensors", "LoRA file")

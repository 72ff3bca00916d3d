"""Adapter and checkpoint files are reproducible: the same tensors and metadata give the same bytes
in every process (safetensors itself writes the metadata in a per-process random order)."""

import hashlib
import json
import struct
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file as library_save_file

from ldm_lab.safetensors_file import sorted_header

WRITE = r"""
import sys, torch
from ldm_lab.safetensors_file import save_file
g = torch.Generator().manual_seed(0)
save_file({"b.weight": torch.randn(3, 4, generator=g), "a.alpha": torch.tensor(4.0)}, sys.argv[1],
          metadata={"format": "pt", "ldm_lab": '{"rank": 4, "note": "é/\\"x\\"\\n"}', "lora_adapter_metadata": "{}",
                    "ss_network_dim": "4", "ss_network_alpha": "4"})
"""


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_tensors_and_metadata_give_the_same_bytes_in_every_process(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True)
    assert len({_sha(p) for p in paths}) == 1
    with safe_open(str(paths[0]), framework="pt") as f:  # the stock reader sees every entry unchanged
        meta = f.metadata()
        assert json.loads(meta["ldm_lab"]) == {"rank": 4, "note": 'é/"x"\n'}
        assert set(meta) == {"format", "ldm_lab", "lora_adapter_metadata", "ss_network_dim", "ss_network_alpha"}
        g = torch.Generator().manual_seed(0)
        assert torch.equal(f.get_tensor("b.weight"), torch.randn(3, 4, generator=g))
    raw = paths[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert list(json.loads(raw[8:8 + n])["__metadata__"]) == sorted(meta)


def test_the_header_is_written_as_the_library_writes_it(tmp_path):
    """With one metadata entry the library's order is fixed: our rewrite must then be the identity
    (same JSON style, escapes and padding), so a sorted file is what the library would write."""
    p = tmp_path / "one.safetensors"
    library_save_file({"x": torch.zeros(5, dtype=torch.float16), "y": torch.ones(2)}, str(p),
                      metadata={"ldm_lab": '{"a": "é\\u0001/\\\\ \\"q\\"\\t"}'})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert sorted_header(raw[8:8 + n]) == raw[8:8 + n]

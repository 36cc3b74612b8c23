"""Converting the bundled GGUF into safetensors is safe when processes race for it.

(tests/workers/test_base_model.py covers resolving, hashing and chat formatting.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.model import load_model_and_tokenizer, resolve_base_model

REPO = Path(__file__).resolve().parents[2]
_RESOLVE = ("import json, sys; from pathlib import Path; "
            "from workers.model import resolve_base_model; "
            "ref = resolve_base_model('bundled:smollm2-135m-instruct', Path(sys.argv[1])); "
            "print(json.dumps([str(ref.local_path), ref.sha256]))")


def test_publishing_a_converted_dir_twice_keeps_the_first_complete_copy(tmp_path: Path) -> None:
    from workers.model.base_model import publish_dir

    target = tmp_path / "models" / "m-123"
    target.parent.mkdir()
    copies = []
    for i in range(2):
        tmp = tmp_path / "models" / f".m-tmp{i}"
        tmp.mkdir()
        (tmp / "model.safetensors").write_text(f"weights {i}")
        (tmp / "oblivio_model.json").write_text("{}")
        copies.append(tmp)
    assert publish_dir(copies[0], target) is True
    assert publish_dir(copies[1], target) is False  # lost the race: the winner stays
    assert (target / "model.safetensors").read_text() == "weights 0"
    # A target that exists without the finished-marker is not silently accepted.
    half = tmp_path / "models" / "half"
    half.mkdir()
    (half / "model.safetensors").write_text("partial")
    with pytest.raises(OSError):
        publish_dir(copies[1], half)


@pytest.mark.e2e
def test_two_processes_converting_the_bundled_gguf_at_once_agree(tmp_path: Path,
                                                                  bundled_model) -> None:
    """The real conversion (~25 s of CPU per process), raced: both win, nothing half-written.

    Marked e2e (slow, ~30-70 s on 2 cores): the session fixture `bundled_model` already
    converts once per cache, so `make test-fast` can skip this.
    """
    data = tmp_path / "data"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _RESOLVE, str(data)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:  # a failed assert or a timeout must not leave the other converter running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert results[0] == results[1]
    path, sha = Path(results[0][0]), results[0][1]
    # The same GGUF converts to the same weights as the session's cached copy.
    assert sha == bundled_model.sha256
    assert path.parent == (data / "models").resolve()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind

    started = time.perf_counter()
    again = resolve_base_model("bundled:smollm2-135m-instruct", data)
    assert time.perf_counter() - started < 1.0  # cached: no conversion, no re-hashing
    assert (again.local_path, again.sha256) == (path, sha)

    load_model_and_tokenizer(again)  # the first load in a process pays for imports
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(again)
    assert time.perf_counter() - started < 5.0  # ~0.5 s from safetensors vs ~25 s from GGUF
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                          "Japan?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert "tokyo" in tokenizer.decode(out[0, ids.shape[1]:]).lower()  # dequantised correctly

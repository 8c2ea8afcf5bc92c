"""`quantkit run` under stress: killed inside a quantization (SIGTERM, then SIGINT) and
run again gives the manifests of an uninterrupted run without rebuilding finished targets; a
SIGTERM during validation exits 130; the model card's commands run and its metrics are the
report's."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from conftest import TRAIN_TEXT, like_a_terminal, make_tiny_model

from quantkit.errors import Interrupted
from quantkit.hashing import sha256_file

VALIDATION = {"data": "text.txt", "ctx": 64, "chunks": 2, "threads": 2, "pp": 16, "tg": 4}
# IQ4_XS/IQ4_NL quantize slowly (a grid search per block: ~1-3 s each for this model on the
# shared 2 cores), so a kill lands inside one reliably; the rest are quick
SLOW_LADDER = [
    {"name": "t0", "type": "Q8_0"},
    {"name": "t1", "type": "Q5_K_M"},
    {"name": "t2", "type": "IQ4_XS"},
    {"name": "t3", "type": "IQ4_NL"},
    {"name": "t4", "type": "IQ4_XS", "output_type": "Q8_0"},
    {"name": "t5", "type": "IQ4_NL", "embedding_type": "Q8_0"},
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runchecks")
    make_tiny_model(d / "tiny", "LlamaForCausalLM")
    (d / "text.txt").write_text(TRAIN_TEXT * 3)
    return d


def _recipe(d: Path, name: str, targets: list[dict], **extra) -> Path:
    # output relative to the current directory: the same recipe file (same recipe sha256 in
    # the manifests) runs into a different folder per cwd
    body = {"name": name, "source": {"model": "tiny"}, "output": "out", "targets": targets}
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump({**body, **extra}, sort_keys=False))
    return p


class Run:
    """`quantkit run RECIPE` in a fresh process, its stderr collected while it runs."""

    def __init__(self, recipe: Path, cwd: Path, *extra: str, env: dict | None = None) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        e = {**os.environ, **(env or {})}
        e.pop("QUANTKIT_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quantkit.cli", "run", str(recipe), *extra],
            cwd=cwd, env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=like_a_terminal,
        )  # fmt: skip
        self.err: list[str] = []
        self._out: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(f, buf), daemon=True)
            for f, buf in ((self.proc.stderr, self.err), (self.proc.stdout, self._out))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(f, buf: list[str]) -> None:
        for line in f:
            buf.append(line)

    def wait_for(self, cond, what: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                self.finish()
                pytest.fail(f"quantkit run ended (rc {self.proc.returncode}) before {what}:\n"
                            + self.stderr[-2000:])  # fmt: skip
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.01)

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    @property
    def out(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def _inside_quantize(run: Run, out: Path, names: list[str]) -> str | None:
    """The target whose quantization is running now: the run said it is building it and
    llama.cpp's output (its temporary) is on disk."""
    for n in names:
        if f"quantize {n}: building" in run.stderr and list((out / n).glob(".*.gguf.*.part")):
            return n
    return None


def _manifests(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in out.glob("*/manifest.json")}


def _interrupt_inside_quantize(recipe: Path, cwd: Path, after: int, sig: int) -> tuple[str, Run]:
    out = cwd / "out"
    names = [t["name"] for t in SLOW_LADDER[after:]]
    run = Run(recipe, cwd)
    hit: list[str] = []

    def inside() -> bool:
        n = _inside_quantize(run, out, names)
        hit.extend([n] if n else [])
        return n is not None

    run.wait_for(inside, f"a quantization of one of {names}")
    run.proc.send_signal(sig)
    rc = run.finish()
    assert rc == 130, run.stderr[-2000:]
    assert "quantkit: interrupted" in run.stderr and "Traceback" not in run.stderr, run.stderr
    return hit[0], run


def _check_nothing_half_written(out: Path, ref_sha: dict[str, str], killed: str) -> None:
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))
    assert not (out / killed / "manifest.json").exists()
    for art in out.glob("t*/*.gguf"):  # whatever is under a final name is the whole file
        assert sha256_file(art) == ref_sha[art.parent.name], art


def _finished(out: Path) -> dict[str, tuple[int, int]]:
    """mtimes (ns) of the artifact and manifest of every target that has a manifest."""
    res = {}
    for m in out.glob("*/manifest.json"):
        art = m.parent / json.loads(m.read_text())["artifact"]
        res[m.parent.name] = (art.stat().st_mtime_ns, m.stat().st_mtime_ns)
    return res


def test_kill_inside_quantization_then_rerun_equals_uninterrupted(work: Path) -> None:
    rec = _recipe(work, "ladder", SLOW_LADDER)
    ref = Run(rec, work / "ref")
    assert ref.finish() == 0, ref.stderr[-2000:]
    ref_out = work / "ref" / "out"
    ref_manifests = _manifests(ref_out)
    assert sorted(ref_manifests) == [t["name"] for t in SLOW_LADDER]
    ref_sha = {n: json.loads(b)["sha256"] for n, b in ref_manifests.items()}

    cwd = work / "killed"
    out = cwd / "out"
    # SIGTERM inside the quantization of the third target or later
    k1, _ = _interrupt_inside_quantize(rec, cwd, 2, signal.SIGTERM)
    _check_nothing_half_written(out, ref_sha, k1)
    done1 = _finished(out)
    assert {"t0", "t1"} <= set(done1) and k1 not in done1, (k1, done1)

    # the rerun, Ctrl-C (SIGINT) inside a later target's quantization
    i1 = [t["name"] for t in SLOW_LADDER].index(k1)
    if i1 + 1 < len(SLOW_LADDER):
        k2, _ = _interrupt_inside_quantize(rec, cwd, i1 + 1, signal.SIGINT)
        _check_nothing_half_written(out, ref_sha, k2)
        assert _finished(out).items() >= done1.items()  # kept, not rebuilt
    done = _finished(out)

    final = Run(rec, cwd, "--json")
    assert final.finish() == 0, final.stderr[-2000:]
    steps = json.loads(final.out)["steps"]
    acts = {s["target"]: s["action"] for s in steps if s["kind"] == "quantize"}
    assert all(acts[n] == "reuse" for n in done), acts
    assert all(acts[n] == "build" for n in acts if n not in done), acts
    after = _finished(out)
    for n, times in done.items():
        assert after[n] == times, f"{n} was rewritten by the rerun"
    # the same manifests, byte for byte, as the uninterrupted run (same sha256s, keys, sizes)
    assert _manifests(out) == ref_manifests


def test_interrupted_is_not_an_exception() -> None:
    """Code that turns a library's failure into a one-line error catches Exception or
    QuantkitError; an interruption must pass through both (exit 130, not 2)."""
    from quantkit.errors import QuantkitError, exit_code_for

    assert not issubclass(Interrupted, Exception)
    assert not issubclass(Interrupted, QuantkitError)
    assert exit_code_for(Interrupted("x")) == 130


def test_tokenizer_loading_lets_an_interruption_through(work: Path, monkeypatch) -> None:
    """The case seen by the lead: a SIGTERM while the reference tokenizer loads was reported as
    "cannot load the reference tokenizer (interrupted by SIGTERM)", exit 2."""
    import transformers

    from quantkit.errors import InputError
    from quantkit.validate.harness import tokenize_reference

    def interrupted(*_a, **_k):
        raise Interrupted("interrupted by SIGTERM")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(Interrupted):
        tokenize_reference(work / "tiny", "text")

    def broken(*_a, **_k):
        raise OSError("no tokenizer files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(InputError, match="cannot load the reference tokenizer"):
        tokenize_reference(work / "tiny", "text")


def test_sigterm_during_validation_exits_130(work: Path) -> None:
    psutil = pytest.importorskip("psutil")
    rec = _recipe(work, "val", [{"name": "q8", "type": "Q8_0"}],
                  validation=VALIDATION, gates={"max_kld": 1.0})  # fmt: skip
    cwd = work / "val"
    tmp = cwd / "tmp"
    tmp.mkdir(parents=True)
    run = Run(rec, cwd, env={"TMPDIR": str(tmp)})
    me = psutil.Process(run.proc.pid)
    run.wait_for(
        lambda: "validate q8: building" in run.stderr and bool(me.children(recursive=True)),
        "the validation worker",
    )
    workers = me.children(recursive=True)
    run.proc.send_signal(signal.SIGTERM)
    rc = run.finish()
    assert rc == 130, run.stderr[-2000:]
    err = run.stderr
    assert "quantkit: interrupted" in err and "Traceback" not in err, err
    assert "cannot load" not in err and "could not be scored" not in err, err
    time.sleep(0.5)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not (cwd / "out" / "q8" / "report.json").exists()
    assert not list(tmp.iterdir()), list(tmp.iterdir())  # the run's temporary folder is gone
    # the artifact was finished before the signal: the next run only validates
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(rec), "--plan", "--json"],
                       cwd=cwd, capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    acts = {(s["kind"], s["target"]): s["action"] for s in json.loads(p.stdout)}
    assert acts == {("quantize", "q8"): "reuse", ("validate", "q8"): "build"}


def _blocks(card: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", card, re.S)


def _check_metrics_are_the_reports(card: str, entry: dict) -> list[str]:
    """Each row `| label | `key` | value |` of the card: the value is the report's at that key,
    rounded as printed (half a unit in the last digit)."""
    keys = []
    for key, shown in re.findall(r"^\| [^|]+ \| `([\w.]+)` \| ([^|]+) \|$", card, re.M):
        val = entry
        for part in key.split("."):
            val = val[part]
        d = Decimal(shown.strip())
        ulp = Decimal(1).scaleb(d.as_tuple().exponent)
        assert abs(Decimal(repr(float(val))) - d) <= ulp / 2, (key, shown, val)
        keys.append(key)
    return keys


def test_model_card_commands_work(work: Path) -> None:
    """The card of a validated GGUF target: its Python snippet runs (llama-cpp-python), its
    `quantkit validate` line runs and measures the same, every metric it names is the report's.
    llama-cli/llama-server/Ollama/vLLM-GGUF lines (tools quantkit does not install) are checked
    for shell syntax and for the files they name."""
    rec = _recipe(work, "val", [{"name": "q8", "type": "Q8_0"}],
                  validation=VALIDATION, gates={"max_kld": 1.0})  # fmt: skip
    cwd = work / "val"  # resumes what test_sigterm_during_validation left, if it ran
    run = Run(rec, cwd)
    assert run.finish() == 0, run.stderr[-2000:]
    d = cwd / "out" / "q8"
    card = (d / "README.md").read_text()
    entry = json.loads((d / "report.json").read_text())["artifacts"][0]
    keys = _check_metrics_are_the_reports(card, entry)
    assert {"quality.ppl", "quality.kld_mean", "quality.top1_pct"} <= set(keys), keys
    blocks = _blocks(card)
    assert [lang for lang, _ in blocks].count("python") == 1
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("QUANTKIT_DEBUG", None)
    ran_validate = False
    for lang, body in blocks:
        if lang == "python":
            p = subprocess.run([sys.executable, "-c", body], cwd=d, capture_output=True,
                               text=True, timeout=300)  # fmt: skip
            assert p.returncode == 0 and p.stdout.strip(), p.stderr[-2000:]
            continue
        assert lang == "sh"
        for line in body.splitlines():
            assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0, line
            argv = shlex.split(line)
            if argv[0] == "quantkit":
                p = subprocess.run(line, shell=True, cwd=d, env=env, capture_output=True,
                                   text=True, timeout=600)  # fmt: skip
                assert p.returncode == 0, p.stderr[-2000:]
                got = json.loads((d / "validate-check.json").read_text())["artifacts"][0]
                for k in ("kld_mean", "ppl", "top1_pct"):
                    assert got["quality"][k] == pytest.approx(entry["quality"][k], rel=1e-6), k
                ran_validate = True
            elif argv[0] == "printf":  # writes the Ollama Modelfile: run it, check its FROM
                assert subprocess.run(line, shell=True, cwd=d).returncode == 0
                src = (d / "Modelfile").read_text().split()[1]
                assert (d / src).is_file(), src
            else:
                assert argv[0] in {"llama-cli", "llama-server", "ollama", "vllm"}, line
                for a in argv[1:]:  # the files it names exist (relative to the card's folder)
                    if a.endswith(".gguf") or a.startswith(("./", "/")):
                        assert (d / a).exists(), (line, a)
    assert ran_validate

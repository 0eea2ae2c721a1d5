"""hf:// checkpoints (pipelines/hub.py), the converter's hf:// source and tools/push_to_hub.py, against a stand-in Hub.

No test touches the network: ``tests/hub_stand_in.py`` serves the Hub's HTTP endpoints on 127.0.0.1 from memory.
``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, into
``huggingface_hub.constants``, and every download / upload function reads those module attributes when called; so
in-process tests set the attributes (``hub_env``: ``ENDPOINT`` and the resolve-URL template built from it at import,
the cache, the offline flag, the token and agent-registry files kept inside the test's folder) and one test runs the
tools as subprocesses with the real environment variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT
from pipelines import hub
from pipelines.checkpoint import CONFIG_FILE, MODEL_FILE, load_config, save_model, weights_hash
from pipelines.convert import convert
from pipelines.errors import ConfigError, UserError
from pipelines.generate import load_pipeline
from pipelines.hub import HubFetchError, HubSpec, HubSpecError, parse_spec
from tests.conftest import ROOT, compose_config, tool_config
from tests.hub_stand_in import StandInHub
from tests.test_convert import _official_yaml, official_tokenizer_sd
from tokenizer.model import load_tokenizer

FILES = (MODEL_FILE, CONFIG_FILE)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A stand-in Hub, and huggingface_hub pointed at it with a cache of this test's own (HF_HOME = tmp/hf)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    with StandInHub() as stand_in:
        for name, value in {"ENDPOINT": stand_in.url,
                            "HUGGINGFACE_CO_URL_TEMPLATE": stand_in.url + "/{repo_id}/resolve/{revision}/{filename}",
                            "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
                            "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                            "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json")}.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv("HF_TOKEN", "stand-in-token")
        monkeypatch.chdir(tmp_path)  # runs/hf/... (results of hf:// checkpoints) lands here
        hub.forget()
        yield stand_in
        hub.forget()


def _offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.forget()  # a new process, as far as the resolver knows


def _upload(stand_in: StandInHub, repo: str, directory: Path, sub: str = "", **kw) -> str:
    prefix = f"{sub}/" if sub else ""
    return stand_in.commit(repo, {prefix + f: (directory / f).read_bytes() for f in FILES}, **kw)


def _tokenizer_copy(tiny_tokenizer: Path, out: Path, seed: int) -> Path:
    """The tiny tokenizer with other weights (so two commits differ in their weights hash)."""
    state, config = load_tokenizer(tiny_tokenizer).state_dict(), load_config(tiny_tokenizer)
    g = torch.Generator().manual_seed(seed)
    save_model(out, {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in state.items()}, config)
    return out


def _generator(tokenizer: Path, tokenizer_dir: str, out: Path) -> Path:
    """A tiny AR checkpoint (random weights) for ``tokenizer``'s 64 codes on an 8x8 grid, naming ``tokenizer_dir``."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, num_classes=3, grid=(8, 8), dim=32, n_layer=1, n_head=2, ffn_multiple_of=16)
    save_model(out, LlamaGPT(cfg).state_dict(), {
        "generator": {"name": "tiny", "model": cfg.to_dict(), "sample": {"cfg_scale": 1.5}},
        "tokenizer_hash": weights_hash(tokenizer), "tokenizer_dir": tokenizer_dir, "classes": ["a", "b", "c"],
        "train": {"batch_size": 8, "lr": 1e-3}, "shards": "runs/tokens"})
    return out


@pytest.fixture
def pair(hub_env, tiny_tokenizer, tmp_path):
    """me/pair: an AR generator at the root whose config names its tokenizer in the subfolder tokenizer/."""
    gen = _generator(tiny_tokenizer, "hf://me/pair/tokenizer", tmp_path / "gen")
    files = {f"tokenizer/{f}": (tiny_tokenizer / f).read_bytes() for f in FILES}
    files |= {f: (gen / f).read_bytes() for f in FILES} | {"README.md": b"# pair\n", "other/big.bin": b"0" * 1000}
    return hub_env.commit("me/pair", files)


# ----------------------------------------------------------------------------------------------- specs

def test_specs_parse_and_a_bad_one_is_one_line(monkeypatch, capsys):
    assert parse_spec("hf://me/tok") == HubSpec("me/tok", None, "")
    assert parse_spec("hf://me/tok@v1/sub/dir/") == HubSpec("me/tok", "v1", "sub/dir")
    assert parse_spec("hf://me/tok@refs%2Fpr%2F1") == HubSpec("me/tok", "refs/pr/1", "")
    assert str(parse_spec("hf://me/tok@refs%2Fpr%2F1/a")) == "hf://me/tok@refs%2Fpr%2F1/a"
    assert hub.results_dir("hf://me/tok@v1/sub") == Path("runs/hf/me/tok@v1/sub")
    assert hub.results_dir("runs/x") == Path("runs/x") and hub.pinned("runs/x/") == "runs/x"
    for bad in ("hf://onlyowner", "hf://me/", "hf://me/tok@", "hf://me/tok/../x", "hf://-x/tok"):
        with pytest.raises(HubSpecError) as err:
            parse_spec(bad)
        assert "\n" not in str(err.value) and "hf://owner/name[@revision][/subfolder]" in str(err.value)
    with pytest.raises(HubSpecError, match="no file path"):
        parse_spec("hf://me/tok@v1", file=True)
    # Refused with the option checks, before any work: one `error:` line, exit code 2.
    from pipelines import sample

    monkeypatch.setattr(sys, "argv", ["sample.py", "ckpt=hf://onlyowner"])
    with pytest.raises(SystemExit) as exited:
        sample.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ckpt: 'hf://onlyowner' is not a Hugging Face Hub spec (owner and name are required")
    with pytest.raises(ConfigError, match="^init_from: 'hf://x' is not"):
        from pipelines.train.init_from import check_init_from
        check_init_from(OmegaConf.create({"init_from": "hf://x", "resume": False, "run_dir": "runs/r"}))


# ----------------------------------------------------------------------------------------------- fetch

def test_fetch_by_repo_revision_and_subfolder_records_the_commit(hub_env, tiny_tokenizer, tmp_path):
    old = _tokenizer_copy(tiny_tokenizer, tmp_path / "old", seed=1)
    first = _upload(hub_env, "me/tok", old)
    hub_env.tag("me/tok", "v1", first)
    latest = _upload(hub_env, "me/tok", tiny_tokenizer, message="retrained")
    assert weights_hash(old) != weights_hash(tiny_tokenizer)

    tok = load_tokenizer("hf://me/tok")                                       # the default branch: the newest
    assert weights_hash("hf://me/tok") == weights_hash(tiny_tokenizer)
    assert hub.hub_commit("hf://me/tok") == latest and hub.pinned("hf://me/tok") == f"hf://me/tok@{latest}"
    assert torch.equal(tok.state_dict()["quantizer.embedding.weight"],
                       load_tokenizer(tiny_tokenizer).state_dict()["quantizer.embedding.weight"])
    for spec in ("hf://me/tok@v1", f"hf://me/tok@{first}"):                    # a tag, a commit
        assert weights_hash(spec) == weights_hash(old) and hub.hub_commit(spec) == first
    # A subfolder: only that checkpoint's two files come down, nothing else of the repository.
    pinned = _upload(hub_env, "me/multi", tiny_tokenizer, sub="tokenizers/a")
    hub_env.commit("me/multi", {"tokenizers/b/model.safetensors": b"x", "README.md": b"# card\n"})
    local = hub.resolve_checkpoint(f"hf://me/multi@{pinned}/tokenizers/a", FILES)
    snapshot = local.parents[1]
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == \
        ["tokenizers/a/config.yaml", "tokenizers/a/model.safetensors"]
    assert load_tokenizer(f"hf://me/multi@{pinned}/tokenizers/a").cfg.num_codes == 64
    assert hub.resolved_commits() == {"hf://me/tok": latest, "hf://me/tok@v1": first, f"hf://me/tok@{first}": first,
                                      f"hf://me/multi@{pinned}/tokenizers/a": pinned}
    # One resolution per process: the branch moving on does not change what this process reads.
    _upload(hub_env, "me/tok", old, message="rolled back")
    assert weights_hash("hf://me/tok") == weights_hash(tiny_tokenizer)


def test_missing_repo_revision_or_subfolder_is_one_line(hub_env, tiny_tokenizer):
    _upload(hub_env, "me/tok", tiny_tokenizer)
    for spec, words in (("hf://me/nope", ["repository me/nope not found", "HF_TOKEN"]),
                        ("hf://me/tok@v9", ["revision v9 not found", "repository me/tok"]),
                        ("hf://me/tok/sub", ["model.safetensors and config.yaml not found", "subfolder sub"])):
        with pytest.raises(HubFetchError) as err:
            load_tokenizer(spec)
        assert "\n" not in str(err.value) and str(err.value).startswith(spec) and all(w in str(err.value)
                                                                                       for w in words), err.value


def test_sampling_from_the_hub_uses_the_recorded_tokenizer_and_records_both_commits(pair, hub_env, tmp_path):
    from pipelines.sample import sample

    model, tokenizer, config = load_pipeline("hf://me/pair")                  # tokenizer: hf://me/pair/tokenizer
    assert config["tokenizer_dir"] == "hf://me/pair/tokenizer" and tokenizer.cfg.num_codes == model.cfg.vocab_size
    result = sample(tool_config("sample", ["ckpt=hf://me/pair", "class=[0,2]", "n=2", "device=cpu"]))
    out = tmp_path / "runs" / "hf" / "me" / "pair" / "samples"              # not inside the Hugging Face cache
    assert Path(result["out"]) == Path("runs/hf/me/pair/samples") and (out / "grid.png").is_file()
    record = json.loads((out / "sample.json").read_text())
    assert record["ckpt"] == "hf://me/pair" and record["tokenizer"] == "hf://me/pair/tokenizer"
    assert record["hub_commits"] == {"hf://me/pair": pair, "hf://me/pair/tokenizer": pair} and record["cfg"] == 1.5
    cached = {p.name for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert cached == {MODEL_FILE, CONFIG_FILE}                               # README.md, other/ never fetched


def test_offline_mode_reads_the_cache_and_says_what_to_do_when_it_cannot(pair, hub_env, monkeypatch):
    load_pipeline("hf://me/pair")                                            # online: fetched into the cache
    hub_env.commit("me/pair", {"README.md": b"# moved on\n"})                # the branch moves; offline cannot know
    _offline(monkeypatch)
    asked = len(hub_env.requests)
    _, _, config = load_pipeline("hf://me/pair")
    assert hub.hub_commit("hf://me/pair") == pair and len(hub_env.requests) == asked  # not one request
    for spec, what in (("hf://me/pair@v2", "revision v2, subfolder (the root)"),
                       ("hf://me/other/sub", "repository me/other, revision main (default), subfolder sub")):
        with pytest.raises(HubFetchError) as err:
            load_tokenizer(spec)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{spec}: not in the Hugging Face cache")
        assert "HF_HUB_OFFLINE=1" in message and what in message and "unset HF_HUB_OFFLINE" in message
    assert len(hub_env.requests) == asked


def test_init_from_and_token_extraction_record_the_hub_commit(hub_env, tiny_tokenizer, tokenizer_cfg, demo_root,
                                                               tmp_path):
    from pipelines.tokens.extract import extract
    from pipelines.tokens.shards import ShardManifest
    from pipelines.train.tokenizer import train as train_tokenizer

    sha = _upload(hub_env, "me/tok", tiny_tokenizer)
    train_tokenizer(tokenizer_cfg(tmp_path / "ft", ["init_from=hf://me/tok", "train.max_steps=1", "eval_at_end=false",
                                                    "ckpt_every=1", "log_every=1"]))
    source = load_config(tmp_path / "ft")["init_from_source"]
    assert source == {"dir": "hf://me/tok", "weights_hash": weights_hash(tiny_tokenizer), "hub_commit": sha,
                      "discriminator": "fresh"}
    extract(compose_config("extract_tokens", ["tokenizer_ckpt=hf://me/tok", f"data.root={demo_root}",
                                              f"out_dir={tmp_path / 'tokens'}", "data.num_workers=0", "cpu=true",
                                              "max_images=8", "batch_size=8"]))
    manifest = ShardManifest.read(tmp_path / "tokens")
    assert manifest.tokenizer_path == f"hf://me/tok@{sha}" and manifest.tokenizer_hash == weights_hash(tiny_tokenizer)


# ----------------------------------------------------------------------------------------------- convert

def test_convert_fetches_one_official_file_by_revision(hub_env, tmp_path):
    repo = "TencentARC/IBQ-Tokenizer-16384"
    src = tmp_path / "imagenet256_16384.ckpt"
    torch.save({"state_dict": official_tokenizer_sd("ibq")}, src)
    yaml = _official_yaml(tmp_path / "ibq.yaml", resolution=16)
    sha = hub_env.commit(repo, {"imagenet256_16384.ckpt": src.read_bytes(), "configs/ibq.yaml": yaml.read_bytes(),
                                "other.ckpt": b"not fetched"})
    hub_env.commit(repo, {"imagenet256_16384.ckpt": b"a newer upload, not a checkpoint"})
    spec = f"hf://{repo}@{sha[:7]}/imagenet256_16384.ckpt"  # an abbreviated commit is no commit: refused by name
    with pytest.raises(HubFetchError, match=f"revision {sha[:7]} not found"):
        convert("ibq-tok", spec, tmp_path / "bad")
    hub_env.tag(repo, "v1", sha)
    spec = f"hf://{repo}@v1/imagenet256_16384.ckpt"
    summary = convert("ibq-tok", spec, tmp_path / "tok", config=f"hf://{repo}@v1/configs/ibq.yaml")
    assert summary["source"] == "ibq-tok" and load_tokenizer(tmp_path / "tok").cfg.num_codes == 16
    origin = load_config(tmp_path / "tok")["converted_from"]
    assert origin["file"] == spec and origin["hub_commit"] == sha
    blobs = list((tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "blobs").iterdir())
    assert len(blobs) == 2                                                    # the file and its YAML, nothing else
    with pytest.raises(HubFetchError, match=r"file missing.ckpt not found \(repository TencentARC"):
        convert("ibq-tok", f"hf://{repo}/missing.ckpt", tmp_path / "none")
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- push

def _ar_run(tiny_tokenizer: Path, run: Path) -> Path:
    """An AR run directory as the trainer leaves it (plus tools' outputs): weights, config naming its local tokenizer,
    train_state's step record, metrics.jsonl, eval JSON files, the sample grid."""
    from PIL import Image

    _generator(tiny_tokenizer, str(tiny_tokenizer), run)
    (run / "train_state").mkdir()
    (run / "train_state" / "state.sha256").write_text(json.dumps({"file": "state.pt", "sha256": "0", "step": 30}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 29, "loss": 4.0}) + "\n")
    (run / "demo_eval.json").write_text(json.dumps({"metrics": {"sample_accuracy": 0.95, "fd_demo": 12.5}}))
    (run / "samples").mkdir()
    Image.new("RGB", (34, 34), (200, 30, 30)).save(run / "samples" / "grid.png")
    return run


def test_push_round_trip_card_files_then_sample_from_the_hub(hub_env, tiny_tokenizer, tmp_path, monkeypatch):
    from pipelines.push_to_hub import PushError, push
    from pipelines.sample import sample

    run = _ar_run(tiny_tokenizer, tmp_path / "ar_run")
    result = push(tool_config("push_to_hub", [f"run={run}", "repo=me/ar-demo"]))
    files = hub_env.files("me/ar-demo")
    assert result["commit"] == hub_env.repos["me/ar-demo"].branches["main"] and result["load"] == "hf://me/ar-demo"
    assert sorted(files) == [".gitattributes", "README.md", CONFIG_FILE, "images/samples_grid.png", MODEL_FILE,
                             f"tokenizer/{CONFIG_FILE}", f"tokenizer/{MODEL_FILE}"]
    assert files[MODEL_FILE] == (run / MODEL_FILE).read_bytes()
    assert files[f"tokenizer/{MODEL_FILE}"] == (tiny_tokenizer / MODEL_FILE).read_bytes()
    pushed = OmegaConf.to_container(OmegaConf.create(files[CONFIG_FILE].decode()))
    assert pushed["tokenizer_dir"] == "hf://me/ar-demo/tokenizer" and pushed["tokenizer_hash"] == \
        weights_hash(tiny_tokenizer)
    card = files["README.md"].decode()
    params = sum(p.numel() for p in LlamaGPT(GPTConfig.from_dict(pushed["generator"]["model"])).parameters())
    for text in ("library_name: ibq-ar", "| layers / heads / width | 1 / 2 / 32 |", f"| parameters | {params:,} |",
                 "| steps | 30 |", "| demo_eval.json | sample_accuracy | 0.95 |", "![samples, one row per class]"
                 "(images/samples_grid.png)", "python tools/sample.py ckpt=hf://me/ar-demo class=0 n=8",
                 "Its tokenizer: `hf://me/ar-demo/tokenizer`"):
        assert text in card, text
    commits = [auth for method, path, auth in hub_env.requests if path.endswith("/commit/main")]
    assert commits == ["Bearer stand-in-token"]                               # huggingface_hub's token (HF_TOKEN)

    # Round trip: sample from what was pushed, as someone else would (a fresh cache, nothing local).
    out = sample(tool_config("sample", ["ckpt=hf://me/ar-demo", "class=1", "n=2", "device=cpu",
                                        f"out={tmp_path / 's'}"]))["out"]
    record = json.loads((Path(out) / "sample.json").read_text())
    assert record["hub_commits"] == {"hf://me/ar-demo": result["commit"], "hf://me/ar-demo/tokenizer": result["commit"]}

    # A tokenizer run to a new branch of a new private repository, then loaded from that branch.
    result = push(tool_config("push_to_hub", [f"run={tiny_tokenizer}", "repo=me/tok-demo", "revision=v1",
                                              "private=true", "message=first tokenizer"]))
    repo = hub_env.repos["me/tok-demo"]
    assert repo.private and repo.branches["v1"] == result["commit"] != repo.branches["main"]
    assert repo.messages[result["commit"]] == "first tokenizer" and result["load"] == "hf://me/tok-demo@v1"
    assert "python tools/reconstruct.py tokenizer=hf://me/tok-demo@v1" in hub_env.files("me/tok-demo", "v1")["README.md"
                                                                                                           ].decode()
    assert weights_hash("hf://me/tok-demo@v1") == weights_hash(tiny_tokenizer)
    push(tool_config("push_to_hub", [f"run={tiny_tokenizer}", "repo=me/tok-demo", "revision=v1"]))  # again: no error

    _offline(monkeypatch)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE=1 is set"):
        push(tool_config("push_to_hub", [f"run={run}", "repo=me/ar-demo"]))
    with pytest.raises(ConfigError, match="repo must be owner/name"):
        push(tool_config("push_to_hub", [f"run={run}", "repo=me/ar-demo@v2"]))
    with pytest.raises(UserError, match="neither a tokenizer nor an AR generator"):
        save_model(tmp_path / "odd", {"w": torch.zeros(1)}, {"something": 1})
        push(tool_config("push_to_hub", [f"run={tmp_path / 'odd'}", "repo=me/x"]))


# ----------------------------------------------------------------------------------------------- the environment

@pytest.mark.slow  # three tool subprocesses (~15 s each on a shared 2-core CPU)
def test_tools_read_hf_endpoint_home_and_offline_from_the_environment(pair, hub_env, tmp_path):
    """As a user runs them: subprocesses configured by HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE alone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": hub_env.url,
           "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": "stand-in-token"}
    env.pop("HF_HUB_CACHE", None)

    def sample(spec: str, offline: bool, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tools" / "sample.py"), f"ckpt={spec}", "class=0", "n=1",
                               "device=cpu", f"out={tmp_path / out}"], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, "HF_HUB_OFFLINE": "1" if offline else "0"}, timeout=300)

    online = sample("hf://me/pair", False, "a")
    assert online.returncode == 0, online.stderr
    assert f"hf://me/pair: commit {pair[:12]}" in online.stdout and (tmp_path / "home" / "hub").is_dir()
    asked = len(hub_env.requests)
    offline = sample("hf://me/pair", True, "b")                                # the cache HF_HOME holds
    assert offline.returncode == 0, offline.stderr
    assert len(hub_env.requests) == asked
    missing = sample("hf://me/pair@v2", True, "c")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: hf://me/pair@v2: not in the Hugging Face cache")
    assert len(hub_env.requests) == asked

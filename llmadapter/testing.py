"""Tiny real Transformers models built locally (no hub): for tests, benchmarks and offline demos.

Every builder writes a `save_pretrained` folder and returns its path; a folder that already holds a
finished build (marker file) is reused, so callers cache builds under a directory of their choice.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Same format, but the template opens with the BOS token and renders `tools` when given.
BOS_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTools: {% for t in tools %}"
    "{{ t['function']['name'] }} {% endfor %}<|im_end|>\n{% endif %}" + CHATML_TEMPLATE
)

# Text the "trained" model learns by heart, so that its greedy output is known real text.
# It holds multi-byte characters so stop strings can be tested on them.
TRAINED_ANSWER = (
    "The quick brown fox jumps over the lazy dog. Café crème, naïve façade: 日本語 text. "
    "Stop words like STOP and END appear here; then the fox sleeps."
)
TRAINED_PROMPT = "Hello"
_CORPUS = (
    "Once upon a time, a small model learned to write. It wrote about foxes, dogs, cafés and "
    '日本語. Numbers: 1 2 3 4 5 6 7 8 9 10. Punctuation, quotes "like this" and emoji 🙂 too.\n'
)
_MARKER = ".llmadapter-testing-built"

Arch = Literal["gpt2", "llama"]


def _train_tokenizer(vocab_size: int = 600):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    chat = (
        f"<|im_start|>user\n{TRAINED_PROMPT}<|im_end|>\n<|im_start|>assistant\n{TRAINED_ANSWER}<|im_end|>\n"
    )
    tok.train_from_iterator([_CORPUS * 4, TRAINED_ANSWER * 4, chat], trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<s>",
        unk_token=None,
    )


def _add_bos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
            ),
        ]
    )
    tokenizer.add_bos_token = True


def _model(arch: Arch, vocab_size: int, n_positions: int, eos_id: int, pad_id: int, bos_id: int, size: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=size,
            n_layer=2,
            n_head=4,
            eos_token_id=eos_id,
            bos_token_id=bos_id,
            pad_token_id=pad_id,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size,
        intermediate_size=size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=n_positions,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _train(model, tokenizer, steps: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    chat = [{"role": "user", "content": TRAINED_PROMPT}, {"role": "assistant", "content": TRAINED_ANSWER}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    plain = tokenizer(TRAINED_ANSWER + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = ids if step % 2 == 0 else plain
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_tiny_model(
    path: str | os.PathLike[str],
    arch: Arch = "gpt2",
    *,
    trained: bool = False,
    bos: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    n_positions: int = 256,
    size: int = 64,
    train_steps: int = 150,
) -> Path:
    """Build (or reuse) a tiny causal LM folder with a locally trained byte-level BPE tokenizer.

    trained: learn TRAINED_ANSWER by heart (greedy chat answer to "Hello" is that text).
    bos: the tokenizer adds a BOS token on encode and the chat template writes one too, the trap
         that produces a double BOS if the template output is re-tokenized with special tokens.
    chat_template: None gives a tokenizer without a chat template.
    """
    path = Path(path)
    if (path / _MARKER).exists():
        return path
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    tokenizer = _train_tokenizer()
    if bos:
        _add_bos(tokenizer)
        chat_template = BOS_TOOLS_TEMPLATE if chat_template == CHATML_TEMPLATE else chat_template
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = n_positions
    model = _model(
        arch,
        len(tokenizer),
        n_positions,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        size,
    )
    if trained:
        _train(model, tokenizer, train_steps)
    # Greedy by default in the saved generation config would hide the sampling-default defect: keep
    # transformers' own defaults.
    # Built beside the target under this process's own name, then renamed: processes building the same
    # model at once (pytest-xdist workers) never see a half-written folder; the first rename wins.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"arch": arch, "trained": trained, "bos": bos}))
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / _MARKER).exists():
            raise
    return path


# --- Hugging Face hub cache layouts (offline tests of hub sources) -------------------------------------

# Files the hub stores through Git LFS: their blob name in the cache is the sha256 of the content;
# every other file is named by its git blob sha1, as huggingface_hub names them after a download.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".model")
_LFS_MIN_SIZE = 10 * 1024 * 1024


def _blob_id(data: bytes, lfs: bool) -> str:
    import hashlib

    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _repo_storage(cache_dir: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _write_commit(storage: Path, files: dict[str, bytes], sha: str | None, revision_name: str) -> str:
    """Write blobs, a snapshot of symlinks to them, the tree listing and the ref, as the hub client does."""
    import hashlib

    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    tree: dict[str, dict[str, object]] = {}
    ids: dict[str, str] = {}
    for rel, data in sorted(files.items()):
        lfs = rel.endswith(_LFS_SUFFIXES) or len(data) >= _LFS_MIN_SIZE
        blob = _blob_id(data, lfs)
        ids[rel] = blob
        if not (blobs / blob).exists():
            (blobs / blob).write_bytes(data)
        entry: dict[str, object] = {"size": len(data), "blob_id": _blob_id(data, False)}
        if lfs:
            entry.update(lfs_sha256=blob, lfs_size=len(data))
        tree[rel] = entry
    if sha is None:
        manifest = "\n".join(f"{rel}\t{blob}" for rel, blob in sorted(ids.items()))
        sha = hashlib.sha1(manifest.encode()).hexdigest()
    snapshot = storage / "snapshots" / sha
    for rel, blob in ids.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        # Relative links, as huggingface_hub creates them, so the cache folder can be moved.
        link.symlink_to(os.path.relpath(blobs / blob, link.parent))
    # huggingface_hub >= 2.x keeps the commit's file listing here and uses it offline to tell a complete
    # snapshot from a partial one; older versions ignore the folder.
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{sha}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    refs = storage / "refs"
    refs.mkdir(exist_ok=True)
    (refs / revision_name).write_text(sha)  # no newline: the hub client reads the file verbatim
    return sha


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def make_hub_cache(
    cache_dir: Path,
    repo_id: str,
    folder: Path,
    *,
    revision_name: str = "main",
    sha: str | None = None,
) -> str:
    """Lay `folder` out as commit `sha` of model repo `repo_id` in a Hugging Face hub cache; return the sha.

    The layout is the one huggingface_hub writes (models--org--name/{blobs,snapshots/<sha>,refs,trees}),
    so huggingface_hub and transformers load `repo_id` from it with HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE=cache_dir. Hidden files (e.g. build markers) are left out. Without `sha`, a fake
    40-hex sha is derived from the content, so the same folder always gives the same commit.
    """
    files = _folder_files(Path(folder))
    return _write_commit(_repo_storage(Path(cache_dir), repo_id), files, sha, revision_name)


def add_hub_commit(
    cache_dir: Path,
    repo_id: str,
    changes: dict[str, bytes | str],
    *,
    revision_name: str = "main",
    sha: str | None = None,
) -> str:
    """A new commit on `revision_name` of a cached repo: the current snapshot with `changes` applied.

    `changes` maps a file path in the repo to its new content (a config with other values, other
    weights). The ref moves to the new commit, like a push upstream followed by a download; the old
    snapshot stays, as it does in a real cache. Returns the new sha.
    """
    storage = _repo_storage(Path(cache_dir), repo_id)
    current = (storage / "refs" / revision_name).read_text().strip()
    files = _folder_files(storage / "snapshots" / current)
    for rel, content in changes.items():
        files[rel] = content.encode() if isinstance(content, str) else content
    return _write_commit(storage, files, sha, revision_name)


@dataclass(frozen=True)
class HubCache:
    """A hub cache folder holding one repo, as the `hub_cache` test fixture hands it out."""

    cache_dir: Path
    repo_id: str
    sha: str

    @property
    def snapshot(self) -> Path:
        return _repo_storage(self.cache_dir, self.repo_id) / "snapshots" / self.sha

    def add_commit(self, changes: dict[str, bytes | str], *, revision_name: str = "main") -> str:
        """Move `revision_name` to a new commit with `changes` applied; returns its sha."""
        return add_hub_commit(self.cache_dir, self.repo_id, changes, revision_name=revision_name)


# --- a tiny GGUF file (offline tests of GGUF sources in seconds) ---------------------------------------


def _llama_cpp_permute(weight, n_head: int):  # type: ignore[no-untyped-def]
    # llama.cpp's converter interleaves the rotary halves of q/k rows; transformers undoes it on load.
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def build_tiny_gguf(path: str | os.PathLike[str], llama_folder: str | os.PathLike[str]) -> Path:
    """Write (or reuse) a GGUF file of a tiny Llama folder from `build_tiny_model(..., "llama")`.

    Laid out as llama.cpp's converter writes it: llama.cpp tensor names, q/k rows permuted, matrices
    quantized to Q8_0 (norms stay F32), and the byte-level BPE tokenizer with its chat template in the
    metadata. transformers loads it with `from_pretrained(folder, gguf_file=name)`.
    """
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    path, folder = Path(path), Path(llama_folder)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tokenizer_config.get("chat_template")
    weights = load_file(folder / "model.safetensors")

    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    vocab.update(specials)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(hidden // n_head)
    writer.add_rope_freq_base(float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in specials else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template(template)

    names = {
        "embed_tokens": "token_embd",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, value in sorted(weights.items()):
        if name == "lm_head.weight":  # tied to the embeddings: llama.cpp writes no output tensor then
            continue
        parts = name.removeprefix("model.").removesuffix(".weight")
        if parts == "norm":
            target = "output_norm"
        elif parts == "embed_tokens":
            target = "token_embd"
        else:
            _, layer, module = parts.split(".", 2)
            target = f"blk.{layer}.{names[module]}"
        array = value.astype(np.float32)
        if target.endswith("attn_q"):
            array = _llama_cpp_permute(array, n_head)
        elif target.endswith("attn_k"):
            array = _llama_cpp_permute(array, n_kv)
        if array.ndim == 2:
            writer.add_tensor(
                f"{target}.weight",
                quantize(array, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(f"{target}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def without_cached(usage: dict[str, Any]) -> dict[str, Any]:
    """A usage dict without `prompt_tokens_details`: two answers to one prompt differ only there when
    the second reused the first's prefill from the prefix cache."""
    return {key: value for key, value in usage.items() if key != "prompt_tokens_details"}

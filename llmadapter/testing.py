"""Tiny real Transformers models built locally (no hub): for tests, benchmarks and offline demos.

Every builder writes a `save_pretrained` folder and returns its path; a folder that already holds a
finished build (marker file) is reused, so callers cache builds under a directory of their choice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

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
    "日本語. Numbers: 1 2 3 4 5 6 7 8 9 10. Punctuation, quotes \"like this\" and emoji 🙂 too.\n"
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
    chat = f"<|im_start|>user\n{TRAINED_PROMPT}<|im_end|>\n<|im_start|>assistant\n{TRAINED_ANSWER}<|im_end|>\n"
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
        shutil.rmtree(path)
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
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"arch": arch, "trained": trained, "bos": bos}))
    tmp.rename(path)
    return path

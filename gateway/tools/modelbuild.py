"""Build tiny random-weight models of real architectures for a CPU vLLM.

Run with the vLLM venv's python (this module imports nothing else from
``gateway``; it needs only the stdlib, torch, transformers and tokenizers)::

    PYTHONPATH=. .venv-vllm/bin/python -m gateway.tools.modelbuild --out .models [--family all]

For each family it writes ``OUT/<family>/`` holding a config, bfloat16
safetensors weights, a generation_config and a byte-level BPE tokenizer
(about 2,048 tokens, trained here on a small built-in corpus of English,
Chinese and code) whose tokenizer_config.json carries the family's chat
template. Nothing is downloaded: hub access is switched off before
transformers is imported and any attempt fails fast.

* qwen3    -- Qwen3ForCausalLM: GQA, per-head q/k RMSNorm, ChatML template.
  Its tokenizer knows ``<think>`` and ``</think>`` as single added tokens
  (not special, as in Qwen3's own) and its template opens ``<think>`` in the
  prompt unless ``enable_thinking`` is false (then it writes an empty
  ``<think>\\n\\n</think>\\n\\n`` block, as Qwen3's does): what vLLM's
  ``qwen3`` reasoning parser and ``thinking_token_budget`` need.
* deepseek -- DeepseekV3ForCausalLM: MLA attention and a MoE (8 routed experts,
  2 per token, 1 shared expert, first layer dense). vLLM's CPU build only
  serves it when:
    - ``topk_method="noaux_tc"`` with ``scoring_func="sigmoid"``: the HF model
      always has a router ``e_score_correction_bias``; vLLM creates (and loads)
      that parameter only for noaux_tc, whose routing is sigmoid-based;
    - the real MLA sizes (kv_lora_rank 512, qk_rope_head_dim 64,
      qk_nope_head_dim 128, v_head_dim 128): the CPU MLA decode kernel only
      exists for a 576-wide latent cache (512 + 64). Weights are bfloat16 and
      are served with ``--dtype bfloat16`` (float32 also ran with vLLM 0.32.0
      and --enforce-eager, but bfloat16 is the tested path);
    - ``tie_word_embeddings=False``: vLLM's DeepSeek model always loads a
      separate ``lm_head.weight``.
* llama    -- LlamaForCausalLM: GQA and Llama-3.1's "llama3" RoPE scaling,
  Llama-3 header/eot chat template.

Random weights would sample special, control or half-UTF-8-byte tokens about
as often as any other, giving empty or invisible stream deltas. So the output
head rows of every special token and of every token that does not decode on
its own to visible text are zeroed (logit exactly 0) and the other rows are
scaled up: greedy decoding then only ever emits visible text, sampling at
temperature 1 almost only (~1e-7 per token), and EOS practically never comes:
generation runs to max_tokens (or to max-model-len if the client sets none).
The thinking tags are zeroed too: the model never opens or closes a thinking
block by itself (vLLM's thinking budget forces ``</think>``; see
docs/vllm-cpu-facts.md).

A ``.build-stamp`` (hash of this file, family, seed and library versions)
makes a repeated run with the same inputs instant ("cached").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

FAMILIES = ("qwen3", "deepseek", "llama")
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096

CORPUS = """\
The quick brown fox jumps over the lazy dog. A gateway forwards each request to
a model server, measures the time to the first token, and streams the answer
back to the client. When a server is busy, the request waits in a queue; when a
server fails, the gateway retries on another one. Good software is tested,
measured and documented. Please summarize the following paragraph in one short
sentence. What is the capital of France? Paris is the capital of France. How
many days are in a week? There are seven days in a week. Thank you very much!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14 2.718 1e-6 -1.
Models read tokens, predict the next token, and repeat until they stop.
今天天气很好。我们去公园散步吧。机器学习是人工智能的一个分支。请用中文回答这个问题。
这个模型很小，但是它可以生成文本。服务器正在运行，请稍等。谢谢你的帮助！你好，世界。
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.host, self.port = host, port

for (int i = 0; i < len; ++i) { total += values[i]; }
const answer = await fetch("/v1/chat/completions", { method: "POST" });
SELECT id, name FROM users WHERE active = 1 ORDER BY name;
{"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
"""

# family -> (special tokens, bos, eos, pad, add bos when encoding, chat template)
SPECIALS: dict[str, tuple[list[str], str | None, str, str, bool, str]] = {
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        False,
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
        "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}",
    ),
    "deepseek": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜▁pad▁｜>",
        True,
        "{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'system' %}{{ m['content'] }}"
        "{%- elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
        "{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}",
    ),
    "llama": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        True,
        "{{ bos_token }}{%- for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}",
    ),
}

# family -> its thinking tags, added as ordinary (not special) tokens of their own: vLLM's reasoning parsers and its
# thinking budget find them by token id.
THINK_TAGS: dict[str, list[str]] = {"qwen3": ["<think>", "</think>"]}


def training_text() -> list[str]:
    """The corpus plus made-up words (fixed-seed) and numbers, so that BPE finds ~2k merges."""
    rng = random.Random(1234)
    sylls = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(sylls) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    lines = CORPUS.splitlines() * 3
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(str(n) for n in range(i, i + 50)) for i in range(0, 500, 50)]
    return lines


def build_tokenizer(family: str) -> Any:
    """Train a byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, add_bos, template = SPECIALS[family]
    tags = THINK_TAGS.get(family, [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials) - len(tags),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
        chat_template=template,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def make_config(family: str, vocab: int, ids: dict[str, int | None]) -> Any:
    """A tiny config of the family's real architecture class."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **ids,
    )
    if family == "qwen3":
        return tf.Qwen3Config(
            **common,
            intermediate_size=256,
            num_key_value_heads=1,
            head_dim=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "llama":  # Llama-3.1 itself has 131072 positions (8192 * factor 16 range)
        common["max_position_embeddings"] = 131072
        return tf.LlamaConfig(
            **common,
            intermediate_size=256,
            num_key_value_heads=1,
            head_dim=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    return tf.DeepseekV3Config(
        **common,
        num_key_value_heads=2,
        intermediate_size=256,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        q_lora_rank=64,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        num_nextn_predict_layers=0,
    )


def visible_ids(tok: Any, family: str) -> list[bool]:
    """Per id: is it an ordinary token that alone decodes to complete, printable, non-blank text?"""
    special = set(tok.all_special_ids) | {
        tok.convert_tokens_to_ids(t) for t in (*SPECIALS[family][0], *THINK_TAGS.get(family, []))
    }
    out = []
    for i in range(len(tok)):
        s = tok.decode([i])
        out.append(
            i not in special
            and bool(s.strip())
            and "\ufffd" not in s
            and all(ch.isprintable() or ch == " " for ch in s)
        )
    return out


def stamp_for(family: str, seed: int) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    versions = {p: md.version(p) for p in ("torch", "transformers", "tokenizers")}
    h.update(json.dumps([family, seed, versions], sort_keys=True).encode())
    return h.hexdigest()


def build(family: str, out_root: Path, seed: int) -> None:
    target = out_root / family
    stamp = stamp_for(family, seed)
    stamp_file = target / ".build-stamp"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp and (target / "config.json").is_file():
        print(f"[modelbuild] {family}: cached ({target})", flush=True)
        return
    t0 = time.monotonic()
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    print(f"[modelbuild] {family}: training tokenizer", flush=True)
    tok = build_tokenizer(family)
    ids = {
        k: (tok.convert_tokens_to_ids(v) if v else None)
        for k, v in (
            ("bos_token_id", tok.bos_token),
            ("eos_token_id", tok.eos_token),
            ("pad_token_id", tok.pad_token),
        )
    }
    config = make_config(family, len(tok), ids)
    print(f"[modelbuild] {family}: building {config.model_type} (vocab {len(tok)}, seed {seed})", flush=True)
    torch.manual_seed(seed)
    cls = {"qwen3": tf.Qwen3ForCausalLM, "llama": tf.LlamaForCausalLM, "deepseek": tf.DeepseekV3ForCausalLM}
    model = cls[family](config).to(torch.bfloat16).eval()
    with torch.no_grad():
        mask = torch.tensor(visible_ids(tok, family))
        head = model.get_output_embeddings().weight
        # The final RMSNorm output has a norm of ~sqrt(hidden): rows of std 0.45 give visible logits a std
        # of ~5, so at temperature 1 the zero logits of the invisible rows keep a probability of ~1e-7.
        head[mask] = torch.randn(int(mask.sum()), head.shape[1]).to(head.dtype) * 0.45
        head[~mask] = 0
    tmp = out_root / f".{family}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp, save_jinja_files=False)  # chat template inside tokenizer_config.json
    tok_cfg = tmp / "tokenizer_config.json"  # a class name older transformers releases know too
    tok_cfg.write_text(
        json.dumps({**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
    )
    eos = [ids["eos_token_id"]]
    if family == "llama":
        eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), ids["eos_token_id"]]
    tf.GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=eos, pad_token_id=ids["pad_token_id"]
    ).save_pretrained(tmp)
    (tmp / ".build-stamp").write_text(stamp + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(
        f"[modelbuild] {family}: wrote {target} ({int(mask.sum())}/{len(tok)} visible tokens, "
        f"{time.monotonic() - t0:.1f}s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.modelbuild", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (one subdirectory per family)")
    ap.add_argument("--family", default="all", choices=(*FAMILIES, "all"))
    ap.add_argument("--seed", default=0, type=int)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES if args.family == "all" else (args.family,):
        try:
            build(family, args.out, args.seed)
        except OSError as exc:  # disk errors, or a hub lookup refused under HF_HUB_OFFLINE
            print(
                f"[modelbuild] {family}: FAILED: {exc} (this builder works offline; it downloads nothing)",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

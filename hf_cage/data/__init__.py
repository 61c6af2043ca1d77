"""Offline text data: a shipped corpus, a locally trained tokenizer, packed token blocks."""

from .blocks import load_token_blocks
from .corpus import shakespeare_files, write_document_split
from .tokenizer import train_bpe_tokenizer

__all__ = ["load_token_blocks", "shakespeare_files", "train_bpe_tokenizer", "write_document_split"]

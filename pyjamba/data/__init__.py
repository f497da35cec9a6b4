"""Training data: the cleaned Austen corpus, a byte-level BPE tokenizer, memory-mapped token arrays,
resumable batch iterators, and chat data for supervised fine-tuning."""

from .bpe import CHATML_TEMPLATE, SPECIAL_TOKENS, tokenizer_hash, train_tokenizer
from .clean import CleanedNovel, clean_austen, clean_novel
from .dataset import IGNORE_INDEX, RandomWindows, StatefulChunks, TokenDataset, eval_batches
from .files import DataError
from .sft import SFTDataset, encode_conversation, read_conversations, sft_collate
from .tokenize import split_documents, token_dtype, tokenize_corpus

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "CleanedNovel",
    "DataError",
    "RandomWindows",
    "SFTDataset",
    "StatefulChunks",
    "TokenDataset",
    "clean_austen",
    "clean_novel",
    "encode_conversation",
    "eval_batches",
    "read_conversations",
    "sft_collate",
    "split_documents",
    "token_dtype",
    "tokenize_corpus",
    "tokenizer_hash",
    "train_tokenizer",
]

"""GPT-2 models: backbone, LM head, Hugging Face checkpoint I/O, tokenizer resolution."""
from models.gpt2 import GPT2LMHeadModel, GPT2Model, GPT2PreTrainedModel

__all__ = ["GPT2Model", "GPT2LMHeadModel", "GPT2PreTrainedModel"]

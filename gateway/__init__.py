"""An OpenAI-compatible gateway that fronts several vLLM servers and compares their models on identical prompts."""

__version__ = "0.1.0"

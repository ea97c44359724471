"""anyclaude: the Anthropic Messages API served from MLX models."""

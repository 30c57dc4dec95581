"""GLM (multi-agent Graph Chain-of-Thought) and the single-agent Graph-CoT baseline."""

"""Evaluating the trained models (book/method.md §5, §6): win rates, MT-Bench, AlpacaEval, reward hacking."""

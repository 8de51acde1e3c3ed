"""Training on TRL's own trainers (book/method.md §4): SFT, reward model, GRPO with AutoRule's rewards, PPO."""

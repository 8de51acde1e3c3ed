"""Rule verification (book/method.md §3): does a response satisfy a rule? One verdict per check."""

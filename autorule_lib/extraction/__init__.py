"""Rule extraction (book/method.md §2): reasoning chains of preference explanations turned into rules."""

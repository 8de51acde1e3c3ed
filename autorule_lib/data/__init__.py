"""The preference data the method starts from (book/method.md §1)."""

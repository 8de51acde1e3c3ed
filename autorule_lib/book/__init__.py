"""The entry points and presentation: the ``autorule`` command, the chapter runner, the HTML book, and the
tables and figures the chapters show. Method code never imports this package."""

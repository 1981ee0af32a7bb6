"""The replica store's parts: the version map and its summaries, the journal format, the file layout."""

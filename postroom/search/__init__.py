"""Search: the query language (`query`), planning it onto the index (`engine`), the documents
the index holds (`document`), keeping the index in step with the mail (`indexer`), snippets with
highlighting (`snippet`), IMAP SEARCH narrowing (`imap`), import and reindex (`cli`)."""

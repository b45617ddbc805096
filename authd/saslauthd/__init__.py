"""Cyrus saslauthd's wire protocol in front of authd's auth decision (`codec`, `listener`)."""

"""Dovecot's auth-client protocol in front of authd's auth decision (`codec`, `listener`)."""

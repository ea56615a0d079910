"""Thin handlers per feature: parse, delegate, translate, write."""

"""The shapes dataset: synthetic scenes, their task targets, and evaluation of a bundle on them."""

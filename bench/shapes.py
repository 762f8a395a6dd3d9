"""The Llama-shaped model every benchmark builds, as command-line options (run from bench/: `from shapes import`)."""


def add_model_args(parser, *, hidden=512, layers=4, heads=8, ffn=1408, vocab=8000):
    """--hidden, --layers, --heads, --ffn, --vocab with the calling benchmark's defaults."""
    for name, default in dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser

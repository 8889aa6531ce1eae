"""What the bench tests share."""


def ctrl_c_on_call(monkeypatch, module, name: str, call: int = 2) -> None:
    """``module.name`` as before, except that its ``call``-th call raises
    KeyboardInterrupt (what Ctrl-C delivers mid-run)."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)

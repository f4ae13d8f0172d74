"""Pure computational core: no files, no terminal. Everything works on an :class:`Objective`."""

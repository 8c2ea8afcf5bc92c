"""The shipped example recipes (``quantkit recipes list``), installed as package data of
``quantkit.recipes`` so that an installed quantkit finds them too."""

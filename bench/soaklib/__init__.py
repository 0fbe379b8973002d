"""The soak's parts (``bench/soak.py`` runs them): what the disk holds (``content``), the
tools it drives (``tools``), the two readers that judge it (``oracle``), and the domain's life
(``life``)."""

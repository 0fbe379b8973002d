"""One module per command of ``virt-bitmapd``, each with ``main(args) -> exit status``; the
command line imports only the one it runs."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3  # check's: a monitoring plugin's unknown

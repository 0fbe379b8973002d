"""virt-bitmapd: keeps qcow2 checkpoint dirty bitmaps whole across block commits."""

__version__ = "0.1.0"

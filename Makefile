# Install virt-bitmapd as a host service (as root):  make install   /  make uninstall
# The program goes into its own virtualenv under $(LIBDIR); the command, unit, config and
# dashboard go to the usual places. An existing config file is never overwritten.
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib/virt-bitmapd
BINDIR     ?= $(PREFIX)/bin
SHAREDIR   ?= $(PREFIX)/share/virt-bitmapd
DOCDIR     ?= $(PREFIX)/share/doc/virt-bitmapd
UNITDIR    ?= /etc/systemd/system
CONFDIR    ?= /etc/virt-bitmapd
CATALOGDIR ?= /usr/local/lib/systemd/catalog
PYTHON     ?= python3

.PHONY: install uninstall demo test soak idle-cost deb

install:
	scripts/setup.sh
	$(PYTHON) -m venv --clear $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/pip install -q .
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	ln -sf $(LIBDIR)/bin/virt-bitmapd $(DESTDIR)$(BINDIR)/virt-bitmapd
	sed 's#/usr/local/bin/virt-bitmapd#$(BINDIR)/virt-bitmapd#; s#/usr/local/share/doc/virt-bitmapd#$(DOCDIR)#' \
		systemd/virt-bitmapd.service > $(DESTDIR)$(UNITDIR)/virt-bitmapd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/virt-bitmapd.service
	[ -e $(DESTDIR)$(CONFDIR)/config.toml ] || install -m 0644 config/config.toml $(DESTDIR)$(CONFDIR)/config.toml
	install -m 0644 dashboards/virt-bitmapd.json dashboards/alerts.yml $(DESTDIR)$(SHAREDIR)/
	install -m 0755 contrib/virtnbdbackup-checked $(DESTDIR)$(SHAREDIR)/
	install -d $(DESTDIR)$(CATALOGDIR)
	sed 's#/usr/share/doc/virt-bitmapd#$(DOCDIR)#' systemd/virt-bitmapd.catalog > $(DESTDIR)$(CATALOGDIR)/virt-bitmapd.catalog
	if [ -z "$(DESTDIR)" ]; then journalctl --update-catalog || true; fi
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

uninstall:
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now virt-bitmapd.service || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/virt-bitmapd.service $(DESTDIR)$(BINDIR)/virt-bitmapd \
		$(DESTDIR)$(CATALOGDIR)/virt-bitmapd.catalog
	if [ -z "$(DESTDIR)" ]; then journalctl --update-catalog || true; fi
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(DOCDIR)
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "kept $(CONFDIR)/config.toml and /var/lib/virt-bitmapd: remove them by hand if wanted"

demo:
	scripts/demo.sh

test:
	scripts/test.sh

# A longer soak than CI's (bench/soak.py): SEED=N MINUTES=M make soak
soak:
	scripts/setup.sh
	.venv/bin/python bench/soak.py --seed $${SEED:-$$(date +%s)} --minutes $${MINUTES:-10}

# What an idle host costs with 10, 50 and 100 running domains beside 500 shut-off ones
# (bench/idle_cost.py; about 15 minutes)
idle-cost:
	scripts/setup.sh
	.venv/bin/python bench/idle_cost.py

# The Debian package, built by Debian's own python3 from a copy of the tree (tracked files and
# new ones not ignored) in $(DEBDIR)/src: $(DEBDIR)/virt-bitmapd_VERSION_all.deb
DEBDIR     ?= build/deb
deb:
	scripts/setup.sh
	rm -rf $(DEBDIR) && mkdir -p $(DEBDIR)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(DEBDIR)/src
	cd $(DEBDIR)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	lintian --fail-on error $(DEBDIR)/virt-bitmapd_*_all.deb

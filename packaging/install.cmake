# Included by the top-level CMakeLists.txt (CPack must be included at the top level).
# What `make install` (cmake --install) and `make package` (the .deb) put where. One file for all
# of it, so that what kiln installs can be read in one place; docs/install.md describes the result.
#
#   PREFIX/bin                      kilnd, kilnctl, kiln-proxy (kilnd runs the kiln-proxy beside it)
#   PREFIX/share/kiln/monitoring    Prometheus config and alert rules, the Grafana dashboard
#   PREFIX/share/doc/kiln           README.md and docs/
#   SYSCONF/kiln/kilnd.yaml         the config file (kept when it exists: an edited one stays)
#   SYSCONF/kiln/manifests/         where that config file looks for manifests (empty)
#   UNITDIR/kiln.service            the systemd unit, running PREFIX/bin/kilnd --config SYSCONF/...
#
# SYSCONF and UNITDIR follow the prefix given at install time (cmake --install --prefix): /etc
# and /lib/systemd/system for /usr (the .deb), PREFIX/etc and PREFIX/lib/systemd/system otherwise
# (systemd also reads /usr/local/lib/systemd/system). They are worked out when installing, not
# when configuring, because `cmake --install --prefix` and CPack choose the prefix then.

# Installing (and CPack's install) needs the three binaries, not every test and benchmark:
# `make install` and `make package` build everything first anyway, scripts/package-test only them.
set(CMAKE_SKIP_INSTALL_ALL_DEPENDENCY ON)
install(TARGETS kilnd kilnctl kiln-proxy RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/monitoring/
        DESTINATION ${CMAKE_INSTALL_DATADIR}/kiln/monitoring)
install(FILES ${PROJECT_SOURCE_DIR}/README.md DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/docs/ DESTINATION ${CMAKE_INSTALL_DOCDIR}
        FILES_MATCHING PATTERN "*.md")

set(KILN_PACKAGING_DIR ${CMAKE_CURRENT_LIST_DIR})
set(KILN_PACKAGING_OUT ${CMAKE_BINARY_DIR}/packaging)
install(CODE "
  set(packaging_dir \"${KILN_PACKAGING_DIR}\")
  set(packaging_out \"${KILN_PACKAGING_OUT}\")
  set(bindir_rel \"${CMAKE_INSTALL_BINDIR}\")
")
install(CODE [[
  if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
    set(KILN_SYSCONFDIR "/etc")
    set(unitdir "/lib/systemd/system")
  else()
    set(KILN_SYSCONFDIR "${CMAKE_INSTALL_PREFIX}/etc")
    set(unitdir "${CMAKE_INSTALL_PREFIX}/lib/systemd/system")
  endif()
  set(KILN_BINDIR "${CMAKE_INSTALL_PREFIX}/${bindir_rel}")
  configure_file("${packaging_dir}/kiln.service.in" "${packaging_out}/kiln.service" @ONLY)
  configure_file("${packaging_dir}/kilnd.yaml.in" "${packaging_out}/kilnd.yaml" @ONLY)
  # file(INSTALL) puts DESTDIR before an absolute DESTINATION itself; EXISTS and MAKE_DIRECTORY
  # do not.
  file(INSTALL "${packaging_out}/kiln.service" DESTINATION "${unitdir}"
       PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
  if(EXISTS "$ENV{DESTDIR}${KILN_SYSCONFDIR}/kiln/kilnd.yaml")
    message(STATUS "Keeping: $ENV{DESTDIR}${KILN_SYSCONFDIR}/kiln/kilnd.yaml (the new one is ${packaging_out}/kilnd.yaml)")
  else()
    file(INSTALL "${packaging_out}/kilnd.yaml" DESTINATION "${KILN_SYSCONFDIR}/kiln"
         PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
  endif()
  file(MAKE_DIRECTORY "$ENV{DESTDIR}${KILN_SYSCONFDIR}/kiln/manifests")
]])

# `make package`: kiln_VERSION_ARCH.deb. Depends come from dpkg-shlibdeps (the libraries the
# binaries link); no maintainer scripts: the unit is not enabled or started by installing (an
# operator writes manifests first, then `systemctl enable --now kiln`), and kilnd runs as root
# (see kiln.service.in), so there is no user to create. Removing the package leaves
# /var/lib/kiln and running instances alone; purging also removes /etc/kiln/kilnd.yaml.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME kiln)
set(CPACK_PACKAGE_VENDOR "Kiln")
set(CPACK_PACKAGE_CONTACT "Kiln maintainers <kiln@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "reconciliation controller for immutable infrastructure (kilnd, kilnctl, kiln-proxy)")
set(CPACK_PACKAGE_DESCRIPTION
    "kilnd watches YAML manifests of services and converges by replacing instances, never patching them in place; kilnctl is its CLI and kiln-proxy its data plane.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # kiln_VERSION_ARCH.deb
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA ${CMAKE_CURRENT_LIST_DIR}/conffiles)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)

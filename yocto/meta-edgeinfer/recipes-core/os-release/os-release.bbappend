# The image identity edgeinfer reports in health (`boot.image_id`, `boot.image_version`) and the
# OTA client reports to the fleet server (os-release(5) IMAGE_ID / IMAGE_VERSION).
IMAGE_ID:edgeinferos = "edgeinfer-image"
IMAGE_VERSION:edgeinferos = "${EDGEINFER_IMAGE_VERSION}"
OS_RELEASE_FIELDS:append:edgeinferos = " IMAGE_ID IMAGE_VERSION"

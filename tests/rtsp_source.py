#!/usr/bin/python3
"""A real RTSP camera on 127.0.0.1 for the tests: GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good/-bad, python3-gi), run with the system python3. ffmpeg cannot serve RTSP to a reader.

    /usr/bin/python3 tests/rtsp_source.py PORT CLIP.mp4   # rtsp://127.0.0.1:PORT/cam, H.264 mp4, no re-encode

Each client gets its own playback of the file from its first frame, in real time, then end of stream."""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, clip = sys.argv[1], sys.argv[2]
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={clip} ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )")
factory.set_shared(False)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot bind 127.0.0.1:{port}")
print("ready", flush=True)
GLib.MainLoop().run()

from setuptools import setup

setup(cffi_modules=["src/vhost_dev_scsi/_build.py:ffibuilder"])

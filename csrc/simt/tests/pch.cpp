// Builds the precompiled header that the SIMT test executables share.

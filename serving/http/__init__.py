"""The HTTP front end: KServe V2 / Open Inference Protocol over REST, convserve.v1's calls as
REST for curl and browsers, and the try-it page, all converters over the data plane."""

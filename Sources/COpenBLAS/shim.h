// cblas.h lives in the openblas-pthread include dir that pkg-config names.
#include <cblas.h>

#include <archive.h>
#include <archive_entry.h>

// The AE_IF* file-type macros are casts, which Swift does not import: re-exported here.
static const unsigned int HRHF_AE_IFMT = AE_IFMT;
static const unsigned int HRHF_AE_IFREG = AE_IFREG;
static const unsigned int HRHF_AE_IFDIR = AE_IFDIR;
static const unsigned int HRHF_AE_IFLNK = AE_IFLNK;
static const unsigned int HRHF_AE_IFCHR = AE_IFCHR;

#include <mpi.h>

// Open MPI's handles (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...) are macros that take the address
// of a global through a cast, which Swift does not import: re-exported here as functions.
static inline MPI_Comm hrhf_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype hrhf_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype hrhf_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype hrhf_mpi_int32(void) { return MPI_INT32_T; }
static inline MPI_Datatype hrhf_mpi_int64(void) { return MPI_INT64_T; }
static inline MPI_Datatype hrhf_mpi_byte(void) { return MPI_BYTE; }
static inline MPI_Op hrhf_mpi_sum(void) { return MPI_SUM; }
static inline void *hrhf_mpi_in_place(void) { return MPI_IN_PLACE; }
static inline MPI_Request hrhf_mpi_request_null(void) { return MPI_REQUEST_NULL; }
static const int HRHF_MPI_SUCCESS = MPI_SUCCESS;
static const int HRHF_MPI_THREAD_FUNNELED = MPI_THREAD_FUNNELED;

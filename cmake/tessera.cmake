# Helpers shared by the module CMakeLists: one static library per module, sources globbed per folder
# (so adding a file is one step), dependencies named explicitly per module.
function(tessera_module name dir)
  cmake_parse_arguments(ARG "" "" "DEPS" ${ARGN})
  file(GLOB _srcs CONFIGURE_DEPENDS ${dir}/*.cpp)
  if(_srcs)
    add_library(${name} STATIC ${_srcs})
    target_link_libraries(${name} PUBLIC tessera_flags ${ARG_DEPS})
    set_target_properties(${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  else()  # header-only so far
    add_library(${name} INTERFACE)
    target_link_libraries(${name} INTERFACE tessera_flags ${ARG_DEPS})
  endif()
endfunction()

# Every test's environment. `ctest -j` runs tests side by side on few cores (CI: 2), where
# libgomp's default spin-waiting makes an OpenMP thread burn its time slice waiting for a thread
# another test has descheduled: passive waiting ran ci-tiny 1.5x faster beside a busy core (0.89
# vs 1.32 s a step) and costs ~5% alone.
set(TESSERA_TEST_ENV "OMP_WAIT_POLICY=PASSIVE")

# tessera_test(<name> SOURCES ... DEPS ... [LABELS ...] [COST c]): one GoogleTest executable,
# each test a ctest case. COST (seconds, roughly) makes `ctest -j` start long tests first.
function(tessera_test name)
  cmake_parse_arguments(ARG "" "COST" "SOURCES;DEPS;LABELS;PROPERTIES" ${ARGN})
  if(NOT ARG_COST)
    set(ARG_COST 0)
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE tessera_flags ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}" TESSERA_BINARY_DIR="${PROJECT_BINARY_DIR}")
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES LABELS "${ARG_LABELS}"
    COST ${ARG_COST} ENVIRONMENT ${TESSERA_TEST_ENV} ${ARG_PROPERTIES}
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()

# tessera_mpi_test(<name> SOURCES ... [DEPS ...] NP n1 [n2 ...] [LABELS ...] [TIMEOUT s]):
# one GoogleTest executable with the MPI main of tests/parallel/mpi_test_main.cpp (every rank
# runs every test; the exit status is nonzero when any rank failed, 77 when every test skipped),
# registered as one ctest per rank count, `<name>_np<N>`, labelled "mpi" plus LABELS. The launch
# line is Open MPI's (--oversubscribe, --bind-to none: CI has two cores and runs up to 8 ranks).
# Running as root in a container needs the OMPI_ALLOW_RUN_AS_ROOT pair; CMA single-copy (vader)
# needs ptrace rights containers usually lack, so shared-memory transfers copy twice instead.
function(tessera_mpi_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;NP;LABELS" ${ARGN})
  if(NOT ARG_NP)
    message(FATAL_ERROR "tessera_mpi_test(${name}): NP needs at least one rank count")
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_executable(${name} ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/parallel/mpi_test_main.cpp)
  target_link_libraries(${name} PRIVATE tessera_flags tessera_parallel ${ARG_DEPS} GTest::gtest)
  target_compile_definitions(${name} PRIVATE
    TESSERA_SOURCE_DIR="${PROJECT_SOURCE_DIR}" TESSERA_BINARY_DIR="${PROJECT_BINARY_DIR}")
  foreach(np ${ARG_NP})
    add_test(NAME ${name}_np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe
                     --bind-to none ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS}
             WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
    set_tests_properties(${name}_np${np} PROPERTIES
      LABELS "mpi;${ARG_LABELS}"
      TIMEOUT ${ARG_TIMEOUT}
      PROCESSORS ${np}
      SKIP_RETURN_CODE 77
      SKIP_REGULAR_EXPRESSION "TESSERA_MPI_TEST_ALL_SKIPPED"
      ENVIRONMENT "${TESSERA_TEST_ENV};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_btl_vader_single_copy_mechanism=none;NCCL_NVLS_ENABLE=0")
    if("cuda" IN_LIST ARG_LABELS)
      # Two NCCL jobs sharing the GPUs under `ctest -j` spin against each other's kernels: one at
      # a time.
      set_tests_properties(${name}_np${np} PROPERTIES RESOURCE_LOCK gpus)
    endif()
  endforeach()
endfunction()

# ctest helper: disassembles CUBIN with CUOBJDUMP and fails unless the SASS holds every
# instruction of REQUIRE (a ;-list of regular expressions). Prints the count of each.
#   cmake -DCUOBJDUMP=... -DCUBIN=... -DREQUIRE="HMMA;LDSM" -P check_sass.cmake
if(NOT EXISTS "${CUBIN}")
  message(FATAL_ERROR "no cubin at ${CUBIN} (build the project first)")
endif()
execute_process(COMMAND "${CUOBJDUMP}" -sass "${CUBIN}" OUTPUT_VARIABLE sass
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${CUOBJDUMP} -sass ${CUBIN} failed (${rc}): ${err}")
endif()
set(missing "")
foreach(pattern IN LISTS REQUIRE)
  string(REGEX MATCHALL "${pattern}" hits "${sass}")
  list(LENGTH hits n)
  message(STATUS "${CUBIN}: ${n} x ${pattern}")
  if(n EQUAL 0)
    list(APPEND missing "${pattern}")
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "SASS of ${CUBIN} lacks: ${missing}")
endif()

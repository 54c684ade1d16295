import CWeftSupport
import WeftProto
import XCTest

/// CRC32C: the interleaved computation of long buffers gives the value of the plain one.
final class ChecksumTests: XCTestCase {
    func testKnownValues() {
        XCTAssertEqual(crc32c(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(crc32c([]), 0)
        XCTAssertEqual(crc32c([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(crc32c([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
    }

    func testInterleavedEqualsSerialAtEveryLengthAroundTheThresholdAndLong() {
        var random = SystemRandomNumberGenerator()
        let bytes = (0..<(1 << 20) + 77).map { _ in UInt8.random(in: 0...255, using: &random) }
        var lengths = Array(3000...3200) + [4096, 65536, 65535, 65537, 1 << 20, (1 << 20) + 77]
        lengths += (0..<200).map { _ in Int.random(in: 3072...(1 << 20), using: &random) }
        bytes.withUnsafeBytes { all in
            for length in lengths {
                for offset in [0, 1, 5] where offset + length <= all.count {
                    let slice = UnsafeRawBufferPointer(rebasing: all[offset..<offset + length])
                    for seed: UInt32 in [0, 0xDEAD_BEEF] {
                        XCTAssertEqual(weft_crc32c(seed, slice.baseAddress, length),
                                       weft_crc32c_serial(seed, slice.baseAddress, length),
                                       "length \(length), offset \(offset), seed \(seed)")
                    }
                }
            }
        }
        // A running checksum over pieces equals the whole one.
        bytes.withUnsafeBytes { all in
            let whole = weft_crc32c(0, all.baseAddress, all.count)
            var running: UInt32 = 0
            var start = 0
            for piece in [5000, 70000, 3071, 3072, 100_000] {
                running = weft_crc32c(running, all.baseAddress! + start, piece)
                start += piece
            }
            running = weft_crc32c(running, all.baseAddress! + start, all.count - start)
            XCTAssertEqual(running, whole)
        }
    }
}
